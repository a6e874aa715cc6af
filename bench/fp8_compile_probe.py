"""Why the FP8 engine's warm-up takes so long on the H200, and what FP8 buys per forward.

Call e7 (2026-12-02) logged ~190 s between the FP8 engine's first block graph and its second
(bf16's took ~50 s). This probe compiles a two-block SD3-medium transformer (random weights, the
engine's own speed work: fused QKV, split queries, FP8 through engine/precision.py) in a fresh
process per variant, with inductor's caches off, and reports the first call's seconds, torch's
per-phase compile times, the slowest functions of the compile (cProfile, `--profile`), and the
steady forward time at 1024² with 32 rows (16 requests with CFG) against bf16.

What calls 1 and 2 found: torch's compile times put 326 of the 367 s (97 of 123 s with pointwise
autotuning off) in `CachingAutotuner.coordinate_descent_tuning`, which torchao's `quantize_`
switches on process-wide unless its config says `set_inductor_config=False`; engine/precision.py
now says so (`fp8-dynamic-cdt` is the old behaviour).

    python -m bench.fp8_compile_probe --out $OUT/fp8_compile_probe_h200.json [--variants ...] [--kernels] [--profile VARIANT]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

VARIANTS = (
    "bf16-dynamic",  # the engine's bf16 blocks
    "fp8-dynamic",  # the engine's FP8 blocks (torchao's inductor settings left alone)
    # FP8 with torchao's recommended inductor settings (coordinate-descent tuning, process-wide):
    # the engine before 2026-12-02 (calls 1 and 2 recorded it as fp8-dynamic-tuned / -untuned)
    "fp8-dynamic-cdt",
    "fp8-static",  # FP8 blocks compiled with dynamic=False (inductor knows the reductions' sizes)
    "bf16-static",
    "fp8attn-dynamic",  # FP8 linears and FP8 attention (fa3-fwd), as --attention-precision fp8
    "fp8tensor-dynamic",  # per-tensor scales (torchao PerTensor: cuBLAS's FP8 GEMM) instead of per-row
    # "-mk": the blocks compiled with inductor's multi-kernel, which also generates a persistent
    # (one pass over a row in registers) version of reductions up to 16x longer than the default
    # 1024 and keeps the faster at the first run: the quantizations of the 1536- and 6144-wide
    # activations are looped two-pass reductions otherwise. "-mkcdt": and coordinate-descent
    # tuning of their launch configs, for these graphs only.
    "fp8-dynamic-mk",
    "fp8-dynamic-mkcdt",
    "bf16-dynamic-mk",
    "fp8attn-dynamic-mk",
    "fp8-static-mk",
    # the engine's FP8 blocks since call e14: multi-kernel and the MLPs' GELU in its sigmoid form
    # (apply_speed with gelu_epilogue on; the other FP8 variants keep diffusers' tanh GELU)
    "fp8sg-dynamic-mk",
    "fp8attnsg-dynamic-mk",  # ... and with FP8 attention: the blocks of --precision fp8 on Hopper
)
# a variant's third word -> inductor options for the blocks' compile
INDUCTOR_OPTIONS = {
    "mk": {"triton.multi_kernel": 1},
    "mkcdt": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True},
}
# variant's first word -> (linear precision for SpeedOptions, attention precision)
PRECISION_OF = {
    "bf16": ("bf16", "bf16"),
    "fp8": ("fp8", "bf16"),
    "fp8sg": ("fp8", "bf16"),
    "fp8attn": ("fp8", "fp8"),
    "fp8attnsg": ("fp8", "fp8"),
    "fp8tensor": ("bf16", "bf16"),
}
GELU_EPILOGUE = ("bf16", "fp8sg", "fp8attnsg")  # apply_speed's GELU work: bf16's cuBLAS epilogue, FP8's sigmoid form


def run_variant(name: str, size: int, rows: int, profile: bool, kernels: bool = False) -> dict:
    import torch

    from bench.measure import event_time_ms, timed
    from bench.shapes import forward_inputs
    from engine.random_model import TRANSFORMERS, building
    from engine.speed import SpeedOptions, apply_speed, compile_blocks
    from diffusers import SD3Transformer2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, how, *tuning = name.split("-")
    if tuning == ["cdt"]:
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    with building(device, torch.bfloat16):
        transformer = SD3Transformer2DModel(**dict(TRANSFORMERS["sd3-medium"], num_layers=2))
    transformer = transformer.to(device, torch.bfloat16).eval().requires_grad_(False)
    linears, attention = PRECISION_OF[precision]
    options = SpeedOptions.fast(
        precision=linears,
        attention_precision=attention,
        gelu_epilogue=precision in GELU_EPILOGUE,
        compile=False,
        text_compile=False,
        vae_compile=False,
        vae_group_norm=False,
        cuda_graphs=False,
    )
    applied = apply_speed(SimpleNamespace(transformer=transformer, vae=None), options)
    if precision == "fp8tensor":
        from engine.precision import quantize_fp8

        applied["fp8_linears"] = quantize_fp8(transformer, granularity="tensor")
    inductor_options = INDUCTOR_OPTIONS.get(tuning[0]) if tuning else None
    if how == "dynamic":  # the engine's: dynamic=True
        compile_blocks(transformer, inductor_options=inductor_options)
    else:
        for block in transformer.transformer_blocks:
            block.compile(dynamic=False, options=inductor_options)
    out: dict = dict(variant=name, applied=applied, inductor_options=inductor_options, size=size, rows=rows, profiled=profile)

    def forward(inputs: dict):
        with torch.inference_mode():
            return transformer(**inputs, return_dict=False)

    first = forward_inputs(transformer, size, device, torch.bfloat16, rows=2)
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    out["first_call_s"] = round(timed(device, lambda: forward(first)).seconds, 1)
    if profiler:
        profiler.disable()
    out["compile_times"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out["profile_tottime"] = text.getvalue()[-6000:]
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        out["profile_cumulative"] = text.getvalue()[-8000:]
    inputs = forward_inputs(transformer, size, device, torch.bfloat16, rows=rows)
    # the batch's own shapes (dynamic: no recompile)
    out["second_shape_s"] = round(timed(device, lambda: forward(inputs)).seconds, 1)
    out["forward_ms"] = round(event_time_ms(device, lambda: forward(inputs), repeats=7, warmup=0), 2)
    if kernels and device.type == "cuda":
        out["kernels"] = kernel_table(forward, inputs)
    return out


KERNEL_KINDS = (  # first match wins, on the lowercased kernel name
    # inductor names a fused kernel after its ops ("triton_red_fused__scaled_mm__to_copy_abs_amax…"
    # is an activation's quantization), so its own kernels are matched first
    ("triton (fused pointwise, norms, quantization)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "scaled_mm", "cutlass", "xmma", "sm90", "f8f8", "matmul", "cublas", "nvjet")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in low for w in words)), "other")


def kernel_table(forward, inputs: dict) -> dict:
    """CUDA time per kernel over 3 forwards (torch.profiler): the 20 largest, and totals by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward(inputs)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    times = [(e.key, e.count, getattr(e, "device_time_total", 0.0) / 3000) for e in events]  # ms per forward
    by_kind: dict[str, float] = {}
    for name, _, ms in times:
        kind = kernel_kind(name)
        by_kind[kind] = round(by_kind.get(kind, 0.0) + ms, 3)
    top = sorted(times, key=lambda t: -t[2])[:20]
    return dict(
        ms_per_forward_by_kind=by_kind,
        top=[dict(name=name[:160], calls_per_forward=count / 3, ms_per_forward=round(ms, 3)) for name, count, ms in top],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="fp8-dynamic,fp8tensor-dynamic,bf16-dynamic", help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--profile", default="", help="a variant whose first call runs under cProfile (slows it ~2x)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument(
        "--engine-json", type=Path, help="also note the variants in this bench/results/engine_<card>.json (`fp8_block_probe`)"
    )
    p.add_argument("--kernels", action="store_true", help="also the CUDA time per kernel of a forward (torch.profiler)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one variant, JSON on stdout
    args = p.parse_args(argv)
    if args.one:
        result = run_variant(args.one, args.size, args.rows, args.one == args.profile, args.kernels)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    results = []
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        cmd = [sys.executable, "-m", "bench.fp8_compile_probe", "--out", str(args.out), "--one", name]
        cmd += ["--profile", args.profile, "--size", str(args.size), "--rows", str(args.rows)]
        cmd += ["--kernels"] if args.kernels else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else dict(variant=name, error=proc.stderr[-3000:])
        results.append(row)
        print(name, {k: row.get(k) for k in ("first_call_s", "second_shape_s", "forward_ms", "error")}, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(size=args.size, rows=args.rows, variants=results), indent=2) + "\n")
    if args.engine_json:
        note_in_engine_results(args.engine_json, dict(size=args.size, rows=args.rows, variants=results))
    return 0


def note_in_engine_results(path: Path, probe: dict) -> None:
    """Add (or replace, by name) the probe's variants in the engine file's `fp8_block_probe`; the
    summary then has `fp8_block_forward_speedup_1024`."""
    from bench.results_file import write_engine_file

    data = json.loads(path.read_text())
    kept = {v["variant"]: v for v in data.get("fp8_block_probe", {}).get("variants", [])}
    kept.update({v["variant"]: {k: x for k, x in v.items() if not k.startswith("profile")} for v in probe["variants"]})
    data["fp8_block_probe"] = dict(
        size=probe["size"],
        rows=probe["rows"],
        blocks=2,
        variants=list(kept.values()),
        command="python -m bench.fp8_compile_probe",
    )
    write_engine_file(path, data)


if __name__ == "__main__":
    raise SystemExit(main())
