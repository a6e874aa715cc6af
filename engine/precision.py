"""The FP8 precision mode: the transformer blocks' linear layers as float8 (e4m3) GEMMs with
per-row dynamic activation scales, through torchao's float8 inference API (PyPI `torchao`,
the optional extra `sd3serve[fp8]`).

Left in bf16: everything outside `transformer_blocks` (patch and position embedder, timestep
and pooled-text embedders, the context embedder, the final norm and projection) and the adaLN
modulation linears of every block (`norm1.linear`, `norm1_context.linear`, ...): they produce
the per-channel shift/scale/gate of every block, so their error multiplies into everything.

FP8 needs Hopper/Ada tensor cores (compute capability >= 8.9); on anything else a worker
refuses to start (`require_precision`) rather than run slower or wrong.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from engine.config import PRECISIONS

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
FP8_INSTALL_HINT = "pip install 'sd3serve[fp8]'"
# torch._scaled_mm wants both GEMM dimensions divisible by 16.
FP8_DIM_MULTIPLE = 16


class PrecisionUnavailable(ValueError):
    """The asked-for precision cannot run on this machine (the message says what is missing)."""


def _torchao_float8_api():
    """torchao's (quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor), or None."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError:
        return None
    return quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor


def fp8_missing(device: torch.device) -> list[str]:
    """What this machine lacks for FP8 (empty: it can run it)."""
    missing = []
    if device.type != "cuda":
        missing.append(f"a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); the device is {device}")
    else:
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            missing.append(f"FP8 tensor cores (compute capability >= 8.9); {name} has {capability[0]}.{capability[1]}")
    if _torchao_float8_api() is None:
        missing.append(f"torchao's float8 inference API ({FP8_INSTALL_HINT})")
    return missing


def require_precision(precision: str, device: torch.device) -> None:
    """Raise `PrecisionUnavailable` naming what is missing when `precision` can't run on `device`."""
    if precision not in PRECISIONS:
        raise PrecisionUnavailable(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp8":
        missing = fp8_missing(device)
        if missing:
            raise PrecisionUnavailable(
                "precision fp8 needs " + " and ".join(missing) + "; use --precision bf16 (SD3SERVE_PRECISION=bf16)"
            )


def precision_problem(config) -> str | None:
    """Why an `EngineConfig`'s precision or attention precision can't run here (None: they can);
    for the CLIs, which refuse to start before loading a model or reaching Redis."""
    attention_precision = getattr(config, "attention_precision", "auto")
    if config.precision == "bf16" and attention_precision in ("bf16", "auto"):
        return None
    from engine.fp8_attention import require_attention_precision
    from engine.loader import resolve_device

    try:
        device = resolve_device(config.device)
        require_precision(config.precision, device)
        if attention_precision != "auto":  # auto falls back to bf16 where FP8 attention can't run
            require_attention_precision(attention_precision, device)
    except (PrecisionUnavailable, ValueError) as exc:
        return str(exc)
    return None


def is_fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    """The layers FP8 applies to, by their name in the transformer: the linears inside
    `transformer_blocks` except the adaLN modulation (any `norm*` submodule), with GEMM
    dimensions FP8 kernels take."""
    if not isinstance(module, torch.nn.Linear):
        return False
    parts = fqn.split(".")
    if parts[0] != "transformer_blocks" or any(p.startswith("norm") for p in parts):
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def fp8_layer_names(transformer: torch.nn.Module) -> list[str]:
    return [name for name, module in transformer.named_modules() if is_fp8_linear(module, name)]


FP8_GRANULARITIES = ("row", "tensor")


def quantize_fp8(transformer: torch.nn.Module, granularity: str = "row") -> int:
    """Swap the chosen linears' weights for torchao float8 tensors (per-row scales, dynamic
    per-row activation scaling; `granularity="tensor"`: one scale per weight and per activation,
    which bench/fp8_compile_probe.py times against it). Run after QKV fusion (the fused weights
    get one scale per output row, as the separate ones would) and before torch.compile. Returns
    the layer count."""
    if granularity not in FP8_GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(FP8_GRANULARITIES)}, got {granularity!r}")
    require_precision("fp8", next(transformer.parameters()).device)
    api = _torchao_float8_api()
    assert api is not None  # checked just above
    quantize_, float8_config, per_row, per_tensor = api
    names = set(fp8_layer_names(transformer))
    scale = per_row() if granularity == "row" else per_tensor()
    # torchao's default (set_inductor_config=True) switches on inductor's coordinate-descent tuning
    # for the whole process: on the H200 that was 97 of the 123 s (326 of 367 s with pointwise
    # autotuning) that two FP8 blocks took to compile (bench/results/fp8_compile_probe_h200*.json),
    # and every later compile in the process, bf16 ones included, would pay it too.
    config = float8_config(granularity=scale, set_inductor_config=False)
    quantize_(transformer, config, filter_fn=lambda m, fqn: fqn in names)
    log.info("fp8: %d linear layers of the transformer blocks quantized (per %s scales)", len(names), granularity)
    return len(names)


class SigmoidFormGelu(torch.nn.Module):
    """diffusers' `GELU(approximate="tanh")` projection for the FP8 MLPs, with the GELU written
    x·sigmoid(2u) (tanh(u) = 2·sigmoid(2u) - 1, u = sqrt(2/π)(x + 0.044715x³)): the same function
    (float32 difference ~5e-7), but inductor's tanh is libdevice's exact tanhf while its sigmoid is
    one exp and one division; fused with the per-row FP8 quantization of its output, the GELU-and-
    quantize kernel took 2.38 instead of 3.14 ms on a 131072 × 6144 activation on the H200
    (bench/results/fp8_quant_kernels_h200.json)."""

    def __init__(self, proj: torch.nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_sigmoid_form(self.proj(hidden_states))


_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_sigmoid_form(y: torch.Tensor) -> torch.Tensor:
    """`F.gelu(y, approximate="tanh")` as y·sigmoid(2u), computed in float32, in y's dtype."""
    x = y.float()
    return (x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))).to(y.dtype)


# Inductor's multi-kernel also generates a persistent (one pass, the row in registers) version of
# reductions up to 16x longer than its default limit of 1024 and keeps the faster one at the first
# run. It makes the FP8 blocks' activation quantizations (rows of 1536 and 6144) one-pass:
# 46.11 -> 44.51 ms per two-block forward at 1024² with 32 rows on the H200, while bf16 blocks
# gained nothing (50.27 / 50.42 ms; bench/results/fp8_compile_probe_h200_mk.json), so they keep
# their graphs as they are.
FP8_BLOCK_INDUCTOR_OPTIONS: dict[str, Any] = {"triton.multi_kernel": 1}


def block_inductor_options(precision: str, backend: str, mode: str | None) -> dict[str, Any] | None:
    """Inductor options for the transformer blocks' compile: FP8's multi-kernel (on inductor with
    no compile mode, which torch.compile does not take together with options)."""
    if precision == "fp8" and backend == "inductor" and mode is None:
        return dict(FP8_BLOCK_INDUCTOR_OPTIONS)
    return None
