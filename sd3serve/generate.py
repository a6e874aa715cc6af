"""`sd3serve generate`: images from prompts on this machine, as one step-level batch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import ATTENTION_PRECISION_SETTINGS, PRECISIONS, EngineConfig, limits_for_model
from engine.request import RequestValidationError, validate_request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="a file with one prompt per line; all run as one batch")
    parser.add_argument("--model", help="a diffusers SD3 pipeline folder or hub id (default: the reference model)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, help="seed of the first image (the next ones get seed+1, ...)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument(
        "--cache-interval",
        type=int,
        help="1 = exact; 2 and 3 (without --cache-policy): the ~1.6x and ~2x presets; other K: the policy at interval K",
    )
    parser.add_argument("--cache-policy", choices=("attention", "step"))
    parser.add_argument("--latent-aware", choices=("none", "seed", "extrapolate"))
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--compile", choices=("auto", "on", "off"), help="the fast exact path; auto = on for CUDA")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp8: FP8 GEMMs in the transformer; needs compute capability >= 8.9 and torchao",
    )
    parser.add_argument(
        "--attention-precision",
        choices=ATTENTION_PRECISION_SETTINGS,
        help="fp8: FP8 attention through FlashAttention-3; needs a Hopper GPU (9.x) and fa3-fwd; "
        "auto (default): fp8 with --precision fp8 where it can run, else bf16",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="output PNG; with several prompts, a folder (default: out.png / outputs/)",
    )


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SystemExit(f"error: prompts file {args.prompts_file} does not exist")
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"error: {args.prompts_file} holds no prompts")
        return prompts
    if not args.prompt:
        raise SystemExit("error: give a prompt, or --prompts-file FILE")
    return [args.prompt]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    prompts = _prompts(args)
    try:
        config = EngineConfig.from_env(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            cache_policy=args.cache_policy,
            latent_aware=args.latent_aware,
            compile=args.compile,
            precision=args.precision,
            attention_precision=args.attention_precision,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    limits = limits_for_model(config.limits, config.model)
    requests = []
    for i, prompt in enumerate(prompts):
        fields = dict(
            prompt=prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance_scale=args.guidance,
            width=args.width,
            height=args.height,
            cache_interval=args.cache_interval,
            cache_policy=args.cache_policy,  # named here, K has its literal meaning (no preset)
            seed=None if args.seed is None else args.seed + i,
        )
        try:
            requests.append(validate_request({k: v for k, v in fields.items() if v is not None}, limits))
        except RequestValidationError as exc:
            raise SystemExit(f"error: {exc}") from None

    from engine.engine import Engine  # torch loads only once the arguments are known good
    from engine.precision import precision_problem

    problem = precision_problem(config)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    try:
        engine = Engine.from_config(config)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load model {config.model!r}: {exc}") from None
    total = sum(r.steps for r in requests)
    with tqdm(total=total, desc="denoising", unit="step", file=sys.stderr) as bar:
        try:
            images = engine.generate(requests, progress=lambda report: bar.update(report.batch_size))
        except (ValueError, RuntimeError) as exc:  # over the cache budget, out of memory
            raise SystemExit(f"error: {exc}") from None
    paths = _write(requests, images, args.output)
    for request, path in zip(requests, paths):
        print(f"{path}\tseed={request.seed}\t{request.prompt}")
    return 0


def _write(requests, images, output: Path) -> list[Path]:
    if len(requests) == 1 and output.suffix.lower() == ".png":
        output.parent.mkdir(parents=True, exist_ok=True)
        images[requests[0].request_id].save(output)
        return [output]
    folder = output if output.suffix.lower() != ".png" else Path("outputs")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, request in enumerate(requests):
        path = folder / f"{i:03d}-{request.seed}.png"
        images[request.request_id].save(path)
        paths.append(path)
    return paths
