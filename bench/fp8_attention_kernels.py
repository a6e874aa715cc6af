"""Low-precision attention kernels that bench/fp8_attention_probe.py times against torch SDPA.

Each candidate's `load(device)` returns a `Kernel` or raises `Unavailable` with the reason it
cannot run here (package missing, wrong GPU, no CUDA). A kernel takes and returns tensors in
SDPA's (batch, heads, tokens, head_dim) layout, bf16; `prepare` does the input conversion
(quantization, layout) and `run` the attention itself, so the probe can time both.

`PACKAGE_FACTS` is what the PyPI wheels said when inspected (issue 17): which torch and CUDA they
are built against, their size, their dependencies. It goes into the probe's JSON as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn

PACKAGE_FACTS: dict[str, dict[str, Any]] = {
    "fa3-fwd": dict(
        version="0.0.3",
        wheel="fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl",
        wheel_mb=27.6,
        carried_as="fa3_fwd-0.0.3.tar.xz (the wheel's files, xz -9: 9.2 MB)",
        built_against="torch stable ABI (only aoti_torch_*/torch_* C symbols, no c10/at C++ ones; README: "
        "built with torch 2.10) and libcudart.so.13",
        requires="torch, einops, packaging, ninja (all in the device image)",
        kernels="FlashAttention-3 forward only; FP8 e4m3 and bf16 (FP16 and backward compiled out), head dims 64-256",
        api="fa3_fwd_interface.flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, "
        "k_descale=None, v_descale=None, ...) -> out; (batch, tokens, heads, dim); descales float32 (batch, kv_heads); "
        "FP8 out is bf16",
    ),
    "sageattention": dict(
        version="1.0.6",
        wheel="sageattention-1.0.6-py3-none-any.whl",
        wheel_mb=0.02,
        built_against="pure Python + Triton kernels (JIT under the device's triton 3.6)",
        requires="torch, triton (both in the device image)",
        kernels="SageAttention 1: INT8 Q·Kᵀ with per-block scales, FP16 P·V; not FP8; head dims 64, 96, 128",
        api="sageattention.sageattn(q, k, v, tensor_layout='HND'|'NHD', is_causal=False, sm_scale=None, "
        "smooth_k=True); bf16 in, bf16 out; smooth_k subtracts k's mean IN PLACE (softmax-invariant)",
    ),
    "flash-attn-4": dict(
        version="4.0.0b36",
        wheel="flash_attn_4-4.0.0b36-py3-none-any.whl",
        wheel_mb=0.53,
        requires="nvidia-cutlass-dsl>=4.6.2 (-> nvidia-cutlass-dsl-libs-base 3.1 MB + libs-cu12 or libs-cu13 "
        "92 MB + libs-core), apache-tvm-ffi 3.3 MB, torch-c-dlpack-ext 0.9 MB, quack-kernels 0.7 MB; none in the "
        "device image",
        verdict="not viable: the CuTe DSL compiler wheel alone (92 MB) is over the 64 MiB carry, and FA4's FP8 "
        "forward asserts SM100 ('FP8 is only supported on SM100', flash_attn/cute/interface.py)",
    ),
    "fbgemm-gpu-genai": dict(
        version="1.6.0 (the torch 2.11 pair in its compat table; 1.9.0 pairs with torch 2.14)",
        wheel="fbgemm_gpu_genai-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        wheel_mb=35.8,
        built_against="torch C++ ABI (c10/at symbols: one torch minor only) and libcudart.so.13",
        verdict="not viable: its only FMHA is cutlass_blackwell_fmha (SM100), and the wheel (34-36 MB) is over "
        "the ~22 MB left beside the repo",
    ),
    "torchao": dict(
        version="0.18.0 (already in .whl, 3.4 MB)",
        kernels="torchao.prototype.attention: FP8 SDPA through torch 2.11's activate_flash_attention_impl('FA3') "
        "and Triton per-head Q/K/V quantization (triton_fp8_sdpa_quantize)",
        verdict="its attention needs the `flash_attn_interface` module (full FA3 with torch.ops.flash_attn_3 fwd "
        "AND bwd), which PyPI does not carry; its quantizer is used here in front of fa3-fwd",
    ),
}


class Unavailable(Exception):
    """A candidate that cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Kernel:
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]
    run: Callable[..., torch.Tensor]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.run(*self.prepare(q, k, v))


@dataclass(frozen=True)
class Candidate:
    name: str
    package: str  # a key of PACKAGE_FACTS
    precision: str
    load: Callable[[torch.device], Kernel]


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a native library that fails to load
        raise Unavailable(f"import {module} failed: {type(exc).__name__}: {exc}") from exc


def _require_cuda(device: torch.device, major: int | None = None) -> None:
    if device.type != "cuda":
        raise Unavailable(f"needs a CUDA GPU (device is {device.type})")
    if major is not None and torch.cuda.get_device_capability(device)[0] != major:
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise Unavailable(f"needs compute capability {major}.x, this GPU is {cc}")


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, tokens, dim) -> float8_e4m3fn of the same strides and its float32 descale
    (batch, heads): x ≈ x8 * descale. The scale is rounded to x's dtype first so the descale
    undoes exactly the factor that was applied."""
    amax = x.abs().amax(dim=(2, 3)).float().clamp(min=1e-12)
    scale = (FP8_MAX / amax).to(x.dtype)
    x8 = (x * scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale.float().reciprocal()


def _fa3_fp8_run(fa3) -> Callable[..., torch.Tensor]:
    def run(q8, k8, v8, dq, dk, dv):
        # FA3 wants (batch, tokens, heads, dim) with a unit last stride: transposed views will do
        out = fa3.flash_attn_func(
            q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2), q_descale=dq, k_descale=dk, v_descale=dv
        )
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return run


def load_fa3_fp8(device: torch.device) -> Kernel:
    fa3 = _import("fa3_fwd_interface")
    _require_cuda(device, major=9)

    def prepare(q, k, v):
        (q8, dq), (k8, dk), (v8, dv) = (quantize_per_head(t) for t in (q, k, v))
        return q8, k8, v8, dq, dk, dv

    return Kernel(prepare, _fa3_fp8_run(fa3))


def load_fa3_fp8_torchao_quant(device: torch.device) -> Kernel:
    fa3 = _import("fa3_fwd_interface")
    quant = _import("torchao.prototype.attention.quantization.triton_qkv_quantization")
    _require_cuda(device, major=9)
    return Kernel(lambda q, k, v: quant.triton_fp8_sdpa_quantize(q, k, v), _fa3_fp8_run(fa3))


def load_fa3_bf16(device: torch.device) -> Kernel:
    fa3 = _import("fa3_fwd_interface")
    _require_cuda(device, major=9)

    def run(q, k, v):
        out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return Kernel(lambda q, k, v: (q, k, v), run)


def load_sage(device: torch.device) -> Kernel:
    sage = _import("sageattention")
    _require_cuda(device)
    return Kernel(lambda q, k, v: (q, k, v), lambda q, k, v: sage.sageattn(q, k, v, tensor_layout="HND"))


def load_flash_attn_4(device: torch.device) -> Kernel:
    _import("flash_attn.cute.interface")
    _require_cuda(device, major=10)  # interface.py asserts SM100 for FP8 inputs
    raise Unavailable("FA4 FP8 on SM100 is not wired into this probe (the device is Hopper)")


def load_fbgemm(device: torch.device) -> Kernel:
    _import("fbgemm_gpu.experimental.gen_ai.attention.cutlass_blackwell_fmha")
    _require_cuda(device, major=10)
    raise Unavailable("fbgemm's cutlass_blackwell_fmha is an SM100 kernel and not wired into this probe")


def load_torchao_fa3(device: torch.device) -> Kernel:
    _import("flash_attn_interface")  # what torch's FA3 registration imports (torch/nn/attention/_fa3.py)
    shared = _import("torchao.prototype.attention.shared_utils.attention")
    _require_cuda(device, major=9)
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    def run(q, k, v):
        activate_flash_attention_impl("FA3")  # process-wide: undone at once so the SDPA baseline stays torch's
        try:
            return shared._fp8_sdpa(q, k, v, backend_name="FA3")
        finally:
            restore_flash_attention_impl()

    return Kernel(lambda q, k, v: (q, k, v), run)


def emulated_fp8_qkv() -> Kernel:
    """Not a kernel: Q/K/V rounded to FP8 per head and back, then bf16 SDPA. Its error is what
    per-head FP8 inputs cost by themselves; a kernel's error above it comes from inside (FA3 FP8
    also rounds the softmax probabilities to FP8 for P·V)."""

    def prepare(q, k, v):
        return tuple((x8.to(t.dtype) * d.to(t.dtype)[:, :, None, None]) for t in (q, k, v) for x8, d in [quantize_per_head(t)])

    return Kernel(prepare, torch.nn.functional.scaled_dot_product_attention)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("fa3_fwd_fp8", "fa3-fwd", "fp8 e4m3 Q/K/V, per-head scales (torch quantization)", load_fa3_fp8),
    Candidate(
        "fa3_fwd_fp8_torchao_quant",
        "fa3-fwd",
        "fp8 e4m3 Q/K/V, per-head scales (torchao's Triton quantization)",
        load_fa3_fp8_torchao_quant,
    ),
    Candidate("fa3_fwd_bf16", "fa3-fwd", "bf16 (FA3 without FP8: what FA3 alone gains)", load_fa3_bf16),
    Candidate("sageattention_int8", "sageattention", "int8 Q·Kᵀ, fp16 P·V", load_sage),
    Candidate("flash_attn_4_fp8", "flash-attn-4", "fp8 e4m3", load_flash_attn_4),
    Candidate("fbgemm_genai_fmha", "fbgemm-gpu-genai", "fp8/bf16 (Blackwell FMHA)", load_fbgemm),
    Candidate("torchao_fp8_fa3", "torchao", "fp8 e4m3 through torch's FA3 SDPA", load_torchao_fa3),
)
