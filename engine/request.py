"""A generation request and its validation. Pure Python: no torch, no Redis.

The API, the Python client, the CLI and the engine all validate through `validate_request`, so a
bad request fails with the same clear message everywhere, before any compute.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

MAX_SEED = 2**63 - 1
CACHE_POLICIES = ("exact", "attention", "step")


class RequestValidationError(ValueError):
    """A request field is invalid. `field` names it; the message says what is allowed."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    """What a deployment accepts, and the defaults it fills in. Configurable per process."""

    min_side: int = 64
    max_side: int = 2048
    size_multiple: int = 16
    max_steps: int = 100
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    max_cache_interval: int = 8
    default_width: int = 128
    default_height: int = 128
    default_steps: int = 20
    default_guidance: float = 5.0
    default_cache_interval: int = 1


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. `seed` is always set once validated."""

    prompt: str
    negative_prompt: str = ""
    width: int = 128
    height: int = 128
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    cache_interval: int = 1
    cache_policy: str | None = None  # None: the worker's default policy
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def uses_cfg(self) -> bool:
        # Same rule as StableDiffusion3Pipeline.do_classifier_free_guidance.
        return self.guidance_scale > 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REQUEST_FIELDS = frozenset(f.name for f in fields(GenerationRequest))


def _int(data: Mapping[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):  # strict, as the API: not 64.0, "64" or true
        raise RequestValidationError(name, f"must be an integer, got {value!r}")
    return value


def _float(data: Mapping[str, Any], name: str, default: float) -> float:
    value = data.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestValidationError(name, f"must be a number, got {value!r}")
    return float(value)


def _text(data: Mapping[str, Any], name: str, limits: RequestLimits, required: bool) -> str:
    value = data.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestValidationError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RequestValidationError(name, "must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise RequestValidationError(name, f"is {len(value)} characters long; the limit is {limits.max_prompt_chars}")
    return value


def _side(data: Mapping[str, Any], name: str, default: int, limits: RequestLimits) -> int:
    value = _int(data, name, default)
    if not limits.min_side <= value <= limits.max_side:
        raise RequestValidationError(name, f"must be between {limits.min_side} and {limits.max_side}, got {value}")
    if value % limits.size_multiple:
        raise RequestValidationError(name, f"must be a multiple of {limits.size_multiple}, got {value}")
    return value


def validate_request(data: Mapping[str, Any], limits: RequestLimits = RequestLimits()) -> GenerationRequest:
    """Check every field of a request dict and return a complete `GenerationRequest`.

    Missing optional fields take the limits' defaults; a missing seed is drawn at random (and is
    then part of the request, so the result is reproducible).
    """
    if not isinstance(data, Mapping):
        raise RequestValidationError("request", "must be a JSON object")
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise RequestValidationError(unknown[0], f"unknown field (allowed: {', '.join(sorted(REQUEST_FIELDS))})")

    prompt = _text(data, "prompt", limits, required=True)
    negative_prompt = _text(data, "negative_prompt", limits, required=False)
    width = _side(data, "width", limits.default_width, limits)
    height = _side(data, "height", limits.default_height, limits)

    steps = _int(data, "steps", limits.default_steps)
    if not 1 <= steps <= limits.max_steps:
        raise RequestValidationError("steps", f"must be between 1 and {limits.max_steps}, got {steps}")

    guidance = _float(data, "guidance_scale", limits.default_guidance)
    if not math.isfinite(guidance):
        raise RequestValidationError("guidance_scale", f"must be finite, got {guidance}")
    if not 0.0 <= guidance <= limits.max_guidance:
        raise RequestValidationError("guidance_scale", f"must be between 0 and {limits.max_guidance}, got {guidance}")

    seed_value = data.get("seed")
    if seed_value is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    else:
        seed = _int(data, "seed", 0)
        if not 0 <= seed <= MAX_SEED:
            raise RequestValidationError("seed", f"must be between 0 and {MAX_SEED}, got {seed}")

    cache_interval = _int(data, "cache_interval", limits.default_cache_interval)
    if not 1 <= cache_interval <= limits.max_cache_interval:
        raise RequestValidationError(
            "cache_interval", f"must be between 1 (exact) and {limits.max_cache_interval}, got {cache_interval}"
        )

    policy = data.get("cache_policy")
    if policy is not None and policy not in CACHE_POLICIES:
        raise RequestValidationError("cache_policy", f"must be one of {', '.join(CACHE_POLICIES)}, got {policy!r}")

    extra: dict[str, Any] = {}
    request_id = data.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
            raise RequestValidationError("request_id", "must be a non-empty string of at most 128 characters")
        extra["request_id"] = request_id

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        cache_interval=cache_interval,
        cache_policy=policy,
        **extra,
    )
