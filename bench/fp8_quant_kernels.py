"""What the FP8 activations' quantization costs on the GPU, kernel by kernel, and what cheaper
formulations of the same numbers buy.

Call e12 (2026-12-02) put the quantization of the MLPs' 6144-wide GELU output at ~2.3 ms per
1024² forward of 32 rows (1.6 GB in, 0.8 GB out: ~1 TB/s, a quarter of the H200's bandwidth),
and FP8 attention's per-head Q/K/V quantization at ~5.8 ms per two blocks, eating most of what
FA3's FP8 kernel saves over cuDNN. Each case here is one compiled function (dynamic shapes, as
the engine's blocks), timed alone on the shapes of a 32-row 1024² SD3-medium forward:

- `gelu_quant_tanh`: tanh-GELU, then per-row amax, scale, clamp and cast (the engine's graph);
- `gelu_quant_sigmoid`: the same GELU written x·sigmoid(2u) (tanh(u) = 2·sigmoid(2u) − 1);
- `quant_only` / `gelu_only`: the row quantization without the GELU, the GELU without it;
- `head_quant_one_stage` / `head_quant_two_stage`: per-(row, head) amax over (tokens, dim) in
  one reduction, or over dim then tokens (the same maximum), and the cast.

    python -m bench.fp8_quant_kernels --out $OUT/fp8_quant_kernels_h200.json [--code]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.measure import event_time_ms
from engine.fp8_attention import FP8_MAX, quantize_per_head
from engine.precision import gelu_tanh_sigmoid_form


def row_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's per-row dynamic activation quantization, as the graph inductor sees it."""
    amax = y.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (y.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def gelu_quant_tanh(x):
    return row_quant(F.gelu(x, approximate="tanh"))


def gelu_quant_sigmoid(x):
    return row_quant(gelu_tanh_sigmoid_form(x))


def quant_only(x):
    return row_quant(x)


def gelu_only(x):
    return F.gelu(x, approximate="tanh")


def head_quant_one_stage(x):
    """engine.fp8_attention.quantize_per_head before call e13: one reduction over (tokens, dim)."""
    amax = x.abs().amax(dim=(2, 3)).float().clamp(min=1e-12)
    scale = (FP8_MAX / amax).to(x.dtype)
    x8 = (x * scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale.float().reciprocal()


head_quant_two_stage = quantize_per_head  # the engine's since call e13


ROW_CASES = dict(
    gelu_quant_tanh=gelu_quant_tanh, gelu_quant_sigmoid=gelu_quant_sigmoid, quant_only=quant_only, gelu_only=gelu_only
)
HEAD_CASES = dict(head_quant_one_stage=head_quant_one_stage, head_quant_two_stage=head_quant_two_stage)


def bytes_moved(x: torch.Tensor, out) -> int:
    outs = out if isinstance(out, tuple) else (out,)
    return x.numel() * x.element_size() + sum(o.numel() * o.element_size() for o in outs)


def run_case(name: str, fn, x: torch.Tensor, code: bool) -> dict:
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fn, dynamic=True)
    out, sources = run_and_get_code(compiled, x)
    ms = event_time_ms(x.device, lambda: compiled(x), repeats=20, warmup=3)
    row = dict(case=name, shape=list(x.shape), ms=round(ms, 3), gb_per_s=round(bytes_moved(x, out) / ms / 1e6, 1))
    if code:
        row["triton"] = [s[s.find("@triton.jit") :][:6000] for s in sources if "@triton.jit" in s]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, default=32, help="forward rows (16 requests with CFG)")
    p.add_argument("--tokens", type=int, default=4096, help="image tokens per row (1024²)")
    p.add_argument("--code", action="store_true", help="also keep the generated Triton kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark times CUDA kernels; run it on the GPU machine")
    torch.manual_seed(0)
    mlp = torch.randn(args.rows * args.tokens, 6144, device="cuda", dtype=torch.bfloat16)
    # Q of the fused projection: (rows, tokens, heads, dim) storage seen as (rows, heads, tokens, dim)
    qkv = torch.randn(args.rows, args.tokens, 3 * 24 * 64, device="cuda", dtype=torch.bfloat16)
    q = qkv[..., : 24 * 64].view(args.rows, args.tokens, 24, 64).transpose(1, 2)
    rows = []
    for cases, x in ((ROW_CASES, mlp), (HEAD_CASES, q)):
        for name, fn in cases.items():
            rows.append(run_case(name, fn, x, args.code))
            print({k: v for k, v in rows[-1].items() if k != "triton"}, flush=True)
    one, two = head_quant_one_stage(q), head_quant_two_stage(q)
    same = bool(torch.equal(one[1], two[1]) and torch.equal(one[0].view(torch.uint8), two[0].view(torch.uint8)))
    result = dict(card=torch.cuda.get_device_name(0), torch=torch.__version__, cases=rows, head_two_stage_bitwise_equal=same)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("head quantizations bitwise equal:", same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
