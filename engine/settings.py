"""Typed settings from `SD3SERVE_*` environment variables, for every process's frozen config.
Pure Python: the API, the worker and the engine all read their variables through here."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping

PREFIX = "SD3SERVE_"


def parse_value(key: str, value: str, like: Any) -> Any:
    """Convert the text of variable `key` to the type of `like` (bool, int, float, tuple or str)."""
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected 1/0 or true/false")
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            number = float(value)
            if not math.isfinite(number):  # no setting means anything at nan or inf
                raise ValueError("expected a finite number")
            return number
        if isinstance(like, tuple):
            return tuple(part.strip() for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{key}={value!r}: {exc}") from None
    return value


def env_values(
    cls: type, env: Mapping[str, str], skip: tuple[str, ...] = (), prefix: str = PREFIX, names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The fields of dataclass `cls` that `env` sets, as `<prefix><FIELD>` (or `names[field]`)."""
    names = names or {}
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        key = names.get(f.name, f"{prefix}{f.name.upper()}")
        if key in env:
            values[f.name] = parse_value(key, env[key], f.default)
    return values
