"""Reading typed settings from SD3SERVE_* environment variables."""
from __future__ import annotations

from typing import Any


def parse_value(key: str, value: str, like: Any) -> Any:
    """Convert the text of variable `key` to the type of `like` (bool, int, float or str)."""
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
            return float(value)
        if isinstance(like, tuple):
            return tuple(part.strip() for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{key}={value!r}: {exc}") from None
    return value
