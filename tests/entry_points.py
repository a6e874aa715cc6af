"""Run a command-line entry point's `main` inside the test process, for checks that end before
any model or server starts (refusals, bad input): an interpreter of its own costs seconds."""

from __future__ import annotations

from typing import Any, Callable


def exit_status(main: Callable[[list[str]], Any], argv: list[str], capsys: Any) -> tuple[int, str]:
    """The exit status and stderr that `python -m <module> argv` would give: a SystemExit with a
    message prints it to stderr and exits 1. Any other exception propagates (a traceback)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if isinstance(code, str):
        return 1, err + code
    return int(code or 0), err
