"""The engine's frozen configuration, filled from `SD3SERVE_*` environment variables and CLI flags.

Pure Python (no torch), so the API and the worker's config can share it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from engine.request import RequestLimits
from engine.settings import env_values

REFERENCE_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "sd3-shapes"
LATENT_AWARE_STRATEGIES = ("none", "seed", "extrapolate", "extrapolate2", "extrapolate-sigma", "extrapolate2-sigma")
DTYPES = ("float32", "bfloat16", "float16")
# bf16: the model's dtype throughout; fp8: the transformer blocks' linears as FP8 GEMMs (engine/precision.py)
PRECISIONS = ("bf16", "fp8")
# bf16: torch SDPA; fp8: per-head FP8 Q/K/V through FlashAttention-3 (engine/fp8_attention.py);
# auto (the setting's default): fp8 with precision fp8 where FA3 runs, else bf16 (a logged warning)
ATTENTION_PRECISIONS = ("bf16", "fp8")
ATTENTION_PRECISION_SETTINGS = ATTENTION_PRECISIONS + ("auto",)
# `--model random:<name>`: random weights at a real model's shapes, built in the worker process,
# for load tests on machines without the real weights (engine/random_model.py). Benchmark use only:
# the images are noise. Serving defaults are the real models' (SD3: 1024², 28 steps, CFG 7).
RANDOM_MODEL_PREFIX = "random:"
RANDOM_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "height": 64, "steps": 4, "guidance_scale": 4.0, "max_sequence_length": 16},
    "sd3-medium": {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 7.0},
    "sd3.5-large": {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 3.5},
}
RANDOM_MODELS = tuple(RANDOM_MODEL_DEFAULTS)
COMPILE_SETTINGS = {
    "auto": "auto",
    "on": "on",
    "off": "off",
    "true": "on",
    "false": "off",
    "1": "on",
    "0": "off",
    "yes": "on",
    "no": "off",
}


def normalize_compile(value: Any) -> str:
    """`compile` accepts auto/on/off, true/false, 1/0 or a bool; returns "auto", "on" or "off"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    setting = COMPILE_SETTINGS.get(str(value).strip().lower())
    if setting is None:
        raise ValueError(f"compile must be auto, on or off (or true/false), got {value!r}")
    return setting


@dataclass(frozen=True)
class EngineConfig:
    model: str = str(REFERENCE_MODEL_DIR)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    max_batch: int = 16  # running requests, all sub-batches (sizes) together
    admit_per_boundary: int = 4  # new requests admitted at one chunk boundary
    cache_policy: str = "attention"  # used when a request has cache_interval > 1
    latent_aware: str = "extrapolate"  # best fidelity at every K in bench/results/quality.json
    warmup_steps: int = 1  # first steps of a request that are always FRESH
    final_fresh_steps: int = 1  # last steps of a request that are always FRESH
    interval_growth: int = 0  # > 0: a request's CACHED-run bound grows 2 -> K, +1 every this many steps
    # 0: each request keeps its own interval, so a request running alone gets its caching speed-up
    # too; 1: at least one running request computes per step (the seed paper's rule: with N <= K
    # requests exactly one is FRESH, so a lone request is never cached). engine/fresh_plan.py
    min_fresh_per_step: int = 0
    cache_presets: bool = True  # cache_interval 2 and 3 without a policy: engine/cache_presets.py
    cache_budget_mb: int = 0  # 0: no limit on attention-cache memory
    prompt_cache_size: int = 256
    max_sequence_length: int = 0  # 0: the model's default (sd3serve.json), else 256
    compile: str = "auto"  # the fast exact path (engine/speed.py): auto = on for CUDA, off for CPU
    # Steps queued on the device at once: after launching a step the engine waits until fewer
    # than this many run, so admissions, the fair share between sizes, cancellations and progress
    # act within a step of the device (engine/step_timer.py). 0: no bound.
    max_steps_in_flight: int = 2
    # > 0 (with max_steps_in_flight 2): behind a step longer than this, the host plans the next
    # one this many ms before the running step's expected end instead of at its start, so jobs
    # arriving meanwhile are seen (engine/step_timer.py). 0: off.
    plan_lead_ms: float = 0.0
    precision: str = "bf16"  # fp8: needs a GPU of compute capability >= 8.9 and torchao
    # fp8 needs a Hopper GPU (9.x) and fa3-fwd; auto: fp8 with precision fp8 where it can run
    attention_precision: str = "auto"
    # Image sizes besides the model's default that the warm-up readies before serving ("512" or
    # "768x512", width x height): every small batch's CUDA graph at each, and its cached steps.
    # A size first seen while serving pays that inside some job (~0.25 s a batch on an H200).
    warm_sizes: tuple[str, ...] = ()
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if self.cache_policy not in ("attention", "step"):
            raise ValueError(f"cache_policy must be 'attention' or 'step', got {self.cache_policy!r}")
        if self.latent_aware not in LATENT_AWARE_STRATEGIES:
            raise ValueError(f"latent_aware must be one of {LATENT_AWARE_STRATEGIES}, got {self.latent_aware!r}")
        if self.dtype not in DTYPES + ("auto",):
            raise ValueError(f"dtype must be one of {DTYPES} or 'auto', got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attention_precision not in ATTENTION_PRECISION_SETTINGS:
            raise ValueError(
                f"attention_precision must be one of {', '.join(ATTENTION_PRECISION_SETTINGS)}, got {self.attention_precision!r}"
            )
        if self.max_batch < 1 or self.admit_per_boundary < 1:
            raise ValueError("max_batch and admit_per_boundary must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.final_fresh_steps < 1:
            raise ValueError("final_fresh_steps must be >= 1 (the last step is always FRESH)")
        if self.min_fresh_per_step not in (0, 1):
            raise ValueError(f"min_fresh_per_step must be 0 or 1, got {self.min_fresh_per_step!r}")
        if self.max_steps_in_flight < 0:
            raise ValueError(f"max_steps_in_flight must be >= 0 (0: no bound), got {self.max_steps_in_flight!r}")
        if not 0 <= self.plan_lead_ms < 60_000:  # also refuses nan and inf
            raise ValueError(f"plan_lead_ms must be >= 0 and < 60000 (0: off), got {self.plan_lead_ms!r}")
        if self.interval_growth < 0:
            raise ValueError("interval_growth must be >= 0 (0: the interval is K from the first step)")
        object.__setattr__(self, "compile", normalize_compile(self.compile))
        self.warm_dimensions()  # a bad size fails here, with its name
        random_model_name(self.model)  # an unknown random:<name> fails here, before any loading

    def warm_dimensions(self) -> list[tuple[int, int]]:
        """`warm_sizes` as (width, height) pairs."""
        out = []
        for text in self.warm_sizes:
            parts = str(text).lower().split("x")
            sides = [int(p) for p in parts if p.strip().isdigit()] if len(parts) <= 2 else []
            if len(sides) != len(parts) or not all(sides):
                raise ValueError(f"warm_sizes: {text!r} is not a size; give sides like 512 or 768x512 (SD3SERVE_WARM_SIZES)")
            out.append((sides[0], sides[-1]))
        return out

    def compile_enabled(self, device_type: str) -> bool:
        """Whether the speed work is on for a device of this type ("cuda", "cpu", ...)."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "EngineConfig":
        """Read `SD3SERVE_<FIELD>` (and `SD3SERVE_<LIMIT>` for request limits); overrides win."""
        env = os.environ if env is None else env
        values = env_values(cls, env, skip=("limits",))
        values["limits"] = limits_from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def limits_from_env(env: Mapping[str, str] | None = None) -> RequestLimits:
    env = os.environ if env is None else env
    return replace(RequestLimits(), **env_values(RequestLimits, env))


MODEL_DEFAULTS_FILE = "sd3serve.json"


def random_model_name(model: str) -> str | None:
    """The shape name of a `random:<name>` model spec, None for any other model."""
    if not model.startswith(RANDOM_MODEL_PREFIX):
        return None
    name = model[len(RANDOM_MODEL_PREFIX) :]
    if name not in RANDOM_MODEL_DEFAULTS:
        raise ValueError(
            f"model {model!r}: random weights come in {', '.join(RANDOM_MODELS)} (e.g. {RANDOM_MODEL_PREFIX}sd3-medium)"
        )
    return name


def read_model_defaults(model: str) -> dict[str, Any]:
    """Serving defaults a model folder ships in `sd3serve.json` (width, height, steps,
    guidance_scale, max_sequence_length); empty for hub ids and folders without the file.
    A `random:<name>` spec has the real model's defaults."""
    name = random_model_name(model)
    if name is not None:
        return dict(RANDOM_MODEL_DEFAULTS[name])
    path = Path(model) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def model_max_side(model: str) -> int | None:
    """The largest image side a local SD3 model folder can take: its transformer's position
    embedding covers `pos_embed_max_size` patches of `patch_size` latents, each latent pixel
    `2 ** (len(vae.block_out_channels) - 1)` image pixels. None when the folder doesn't say."""
    try:
        transformer = json.loads((Path(model) / "transformer" / "config.json").read_text())
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        return int(transformer["pos_embed_max_size"]) * int(transformer["patch_size"]) * scale
    except (OSError, KeyError, TypeError, ValueError):
        return None


def limits_for_model(limits: RequestLimits, model: str) -> RequestLimits:
    """Fill request defaults from the model's `sd3serve.json` where the environment set none,
    and cap the image side at what the model's position embedding covers."""
    defaults = read_model_defaults(model)
    mapping = {
        "width": "default_width",
        "height": "default_height",
        "steps": "default_steps",
        "guidance_scale": "default_guidance",
    }
    changes = {
        target: defaults[source]
        for source, target in mapping.items()
        if source in defaults and getattr(limits, target) == getattr(RequestLimits(), target)
    }
    max_side = model_max_side(model)
    if max_side is not None and max_side < limits.max_side:
        changes["max_side"] = max_side
    return replace(limits, **changes)
