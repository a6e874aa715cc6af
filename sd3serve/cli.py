"""`sd3serve` entry point. Each subcommand lives in its own module, imported only when used,
so `sd3serve up` never loads torch in the parent process."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "generate": ("sd3serve.generate", "generate images from prompts on this machine"),
    "worker": ("sd3serve.worker_cmd", "run a batching GPU worker on the Redis queue"),
    "up": ("sd3serve.up", "start the embedded stack: Redis, the API and one worker"),
    "webhooks": ("sd3serve.webhooks_cmd", "deliver webhooks from the Redis queue (a worker also does)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="sd3serve", description="Serve Stable Diffusion 3 models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = argparse.ArgumentParser(prog=f"sd3serve {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
