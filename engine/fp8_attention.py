"""The attention precision setting (`attention_precision`, SD3SERVE_ATTENTION_PRECISION): how
`FusedJointProcessor` (engine/fused_qkv.py) computes softmax(QKᵀ/√d)V.

- `bf16`: torch SDPA, exactly as before (`SdpaAttend`).
- `fp8`: Q, K and V quantized per (row, head) to float8 e4m3 and FlashAttention-3's FP8 forward
  (PyPI `fa3-fwd`, module `fa3_fwd_interface`; bench/README.md "FP8 attention"), bf16 out
  (`Fp8Attend`). Needs a Hopper GPU (compute capability 9.x): FA3 is compiled for SM90 only.
- `auto` (the default): `fp8` when the linears are FP8 (`precision="fp8"`) and this machine can
  run it, else `bf16`, with a warning saying what is missing (`choose_attention_precision`).

A strategy takes the queries of one attention (one tensor, or the image and the text queries
with `split_queries`) and the joint keys and values, all (batch, heads, tokens, dim), and returns
one output per query tensor in the same layout; K and V are quantized once for all queries.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import ATTENTION_PRECISIONS
from engine.precision import PrecisionUnavailable

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FA3_MODULE = "fa3_fwd_interface"
FA3_INSTALL_HINT = "pip install fa3-fwd==0.0.3 (bench/fp8_attention_wheels.sh)"
FA3_CAPABILITY_MAJOR = 9

# (q8, k8, v8, q_descale, k_descale, v_descale) -> out; tensors (batch, heads, tokens, dim),
# descales float32 (batch, heads).
Fp8Kernel = Callable[..., torch.Tensor]


class AttentionUnavailable(PrecisionUnavailable):
    """The asked-for attention precision cannot run on this machine (the message says why)."""


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, tokens, dim) -> float8_e4m3fn of the same layout and its float32 descale
    (batch, heads): x ≈ x8 * descale. The scale is rounded to x's dtype first so the descale
    undoes exactly the factor that was applied."""
    # Over each token's head first (a contiguous reduction), then over the tokens: the same
    # maximum, but inside the compiled block one (tokens × dim) reduction per head is strided and
    # looped (1.56 ms for K at 1024² with 32 rows on the H200) where the two-stage one is
    # persistent (0.55 ms): FP8-attention blocks 43.13 -> 40.48 ms (bench/fp8_compile_probe.py).
    amax = x.abs().amax(dim=3).amax(dim=2).float().clamp(min=1e-12)
    scale = (FP8_MAX / amax).to(x.dtype)
    x8 = (x * scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale.float().reciprocal()


class SdpaAttend:
    """Today's path: one torch SDPA call per query tensor."""

    name = "bf16"

    def __call__(self, queries: Sequence[torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False) for q in queries]


class Fp8Attend:
    """Per-head FP8 Q/K/V into `kernel` (FA3's FP8 forward on the GPU; tests pass a reference)."""

    name = "fp8"

    def __init__(self, kernel: Fp8Kernel) -> None:
        self.kernel = kernel

    def __call__(self, queries: Sequence[torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        (k8, dk), (v8, dv) = quantize_per_head(k), quantize_per_head(v)
        outs = []
        for q in queries:
            q8, dq = quantize_per_head(q)
            outs.append(self.kernel(q8, k8, v8, dq, dk, dv))
        return outs


Attend = SdpaAttend | Fp8Attend


def fa3_fp8_kernel(fa3: Any) -> Fp8Kernel:
    """FA3's FP8 forward in our layout: it takes (batch, tokens, heads, dim) with a unit last
    stride, which the transposed views of (batch, heads, tokens, dim) tensors are."""

    def run(q8, k8, v8, dq, dk, dv):
        out = fa3.flash_attn_func(
            q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2), q_descale=dq, k_descale=dk, v_descale=dv
        )
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return run


def reference_fp8_kernel(q8, k8, v8, dq, dk, dv) -> torch.Tensor:
    """What an FP8 attention kernel computes, in float32 on any device: the dequantized inputs
    through SDPA (a kernel differs by its own rounding, e.g. FA3 rounds P to FP8 for P·V)."""

    def dequantize(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
        return x8.float() * descale[:, :, None, None]

    return F.scaled_dot_product_attention(dequantize(q8, dq), dequantize(k8, dk), dequantize(v8, dv))


def _import_fa3() -> Any:
    try:
        return importlib.import_module(FA3_MODULE)
    except Exception:  # an ImportError, or a native library (libcudart.so.13) that fails to load
        return None


def fp8_attention_missing(device: torch.device) -> list[str]:
    """What this machine lacks for FP8 attention (empty: it can run it)."""
    missing = []
    if device.type != "cuda":
        missing.append(f"a Hopper GPU (compute capability 9.x); the device is {device}")
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if major != FA3_CAPABILITY_MAJOR:
            name = torch.cuda.get_device_name(device)
            missing.append(f"a Hopper GPU (compute capability 9.x); {name} has {major}.{minor}")
    if _import_fa3() is None:
        missing.append(f"FlashAttention-3's FP8 forward (module {FA3_MODULE}: {FA3_INSTALL_HINT})")
    return missing


def require_attention_precision(attention_precision: str, device: torch.device) -> None:
    """Raise `AttentionUnavailable` naming what is missing when the setting can't run on `device`."""
    if attention_precision not in ATTENTION_PRECISIONS:
        raise AttentionUnavailable(
            f"attention_precision must be one of {', '.join(ATTENTION_PRECISIONS)}, got {attention_precision!r}"
        )
    if attention_precision == "fp8":
        missing = fp8_attention_missing(device)
        if missing:
            raise AttentionUnavailable(
                "attention precision fp8 needs "
                + " and ".join(missing)
                + "; use --attention-precision bf16 (SD3SERVE_ATTENTION_PRECISION=bf16)"
            )


def choose_attention_precision(precision: str, setting: str, missing: Sequence[str]) -> tuple[str, str | None]:
    """The attention precision a setting means for linears in `precision`, given what this
    machine lacks for FP8 attention (`fp8_attention_missing`), and a warning when `auto` falls
    back to bf16. Explicit settings are kept: `fp8` refuses later where it can't run."""
    if setting != "auto":
        return setting, None
    if precision != "fp8":
        return "bf16", None
    if missing:
        return "bf16", (
            "precision fp8 runs attention in bf16: FP8 attention needs "
            + " and ".join(missing)
            + " (about 1.1x the FP8 linears' images/s on an H200; --attention-precision bf16 silences this)"
        )
    return "fp8", None


def resolve_attention_precision(precision: str, setting: str, device: torch.device) -> str:
    """`choose_attention_precision` on this machine, logging the fallback's warning."""
    missing = fp8_attention_missing(device) if setting == "auto" and precision == "fp8" else []
    choice, warning = choose_attention_precision(precision, setting, missing)
    if warning:
        log.warning(warning)
    return choice


def attention_strategy(attention_precision: str, device: torch.device) -> Attend:
    """The strategy for the setting; refuses (`AttentionUnavailable`) what can't run here."""
    require_attention_precision(attention_precision, device)
    if attention_precision == "bf16":
        return SdpaAttend()
    return Fp8Attend(fa3_fp8_kernel(_import_fa3()))
