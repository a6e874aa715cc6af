"""The command line of bench/engine_bench.py: its parts and options."""

from __future__ import annotations

import argparse

from bench.cache_settings import parse_settings

ALL_PARTS = (
    "probe",
    "ablation",
    "e2e",
    "diffusers-compiled",
    "xdit",
    "stability-ref",
    "accuracy",
    "caching",
    "memory",
    "large",
    "firststep",
)
BASELINE_PARTS = ("xdit", "stability-ref")  # need carried code (.whl, .vendor): only when named


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="GPU benchmark of sd3serve's engine against diffusers' StableDiffusion3Pipeline, in one run."
    )
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (seconds; for tests)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--card", default=None, help="name in the output files (default: from the GPU)")
    p.add_argument("--parts", default=",".join(part for part in ALL_PARTS if part not in BASELINE_PARTS))
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--eager-batches", default=None, help="batches for the eager engine (default: --batches)")
    p.add_argument(
        "--stability-batches",
        default="1",
        help="images per sampling call of the Stability reference (its driver: 1; more go through its sampler batched)",
    )
    p.add_argument("--no-xdit-compile", action="store_true", help="the xdit part measures xDiT eager only")
    p.add_argument("--caching-batches", default="4,8")
    p.add_argument("--large-batches", default="1,2,4")
    p.add_argument(
        "--caching-settings",
        type=parse_settings,
        default=None,
        help="the caching part times these policy:K:latent_aware[:wN][:fM] settings (wall clock vs exact, "
        "bench/settings_speed.py) instead of its fixed modes",
    )
    p.add_argument("--caching-admit", type=int, default=4, help="with --caching-settings: requests admitted per boundary")
    p.add_argument("--probe-batches", default="16,32")
    p.add_argument("--max-probe-batch", type=int, default=256)
    p.add_argument(
        "--merge", action="store_true", help="add to the result files already in --out-dir, replacing the rows of the parts run"
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="e2e and accuracy also run the fast path with FP8 linears and bf16 attention (rows exact-fp8-linears, "
        "attention-k3-fp8-linears; needs compute capability >= 8.9 and torchao)",
    )
    p.add_argument(
        "--fp8-attention",
        action="store_true",
        help="implies --fp8; also FP8 as --precision fp8 runs on Hopper, FP8 linears and FP8 attention "
        "(rows exact-fp8, attention-k3-fp8; needs a Hopper GPU and fa3-fwd)",
    )
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--small-reps", type=int, default=3, help="repetitions at batch <= 2")
    p.add_argument("--sdpa", default=None, help="SDPA priority for the fast path, e.g. cudnn,flash")
    p.add_argument("--ablation-variants", default="", help="comma list of ablation variants (default: all)")
    p.add_argument(
        "--no-vae-compile",
        action="store_true",
        help="keep the VAE decoder eager on the fast path (its compile takes minutes; the ablation then skips it too)",
    )
    p.add_argument("--vae-size", type=int, default=None, help="image size of the ablation's VAE variants (default: the largest)")
    p.add_argument(
        "--vae-compiles",
        default="whole",
        help="compiled VAE variants the ablation measures (comma list of engine.speed.VAE_COMPILES)",
    )
    p.add_argument("--vae-compile-how", default="whole", help="how the fast path compiles the VAE decoder")
    p.add_argument(
        "--joint-queries",
        action="store_true",
        help="one SDPA call over concatenated image and text queries on the fast path (the default splits them)",
    )
    p.add_argument("--no-vae-group-norm", action="store_true", help="the fast path's VAE keeps torch's GroupNorm")
    p.add_argument("--no-gelu-epilogue", action="store_true", help="keep GELU as its own kernel on the fast path")
    p.add_argument("--no-cuda-graphs", action="store_true", help="no CUDA graphs for small forwards on the fast path")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.parts = tuple(x for x in args.parts.split(",") if x)
    args.sizes, args.batches = ints(args.sizes), ints(args.batches)
    args.caching_batches, args.large_batches = ints(args.caching_batches), ints(args.large_batches)
    args.stability_batches = ints(args.stability_batches)
    args.probe_batches = ints(args.probe_batches)
    args.ablation_variants = [v for v in args.ablation_variants.split(",") if v]
    args.eager_batches = ints(args.eager_batches) if args.eager_batches else None
    if args.smoke:
        args.sizes = [s for s in args.sizes if s <= 128] or [64]
        args.steps = min(args.steps, 3)
    args.fp8 = args.fp8 or args.fp8_attention
    unknown = set(args.parts) - set(ALL_PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(ALL_PARTS)}")
    return args
