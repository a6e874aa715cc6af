"""Quality cost of caching, measured on the reference model.

For every policy / cache interval K / latent-aware strategy: judge accuracy over a fixed seeded
set of held-out prompts, SSIM and PSNR against the exact path on the same seeds, and the FLOP
fraction of the exact path. Requests stream through the engine as a worker would feed them
(admission at chunk boundaries, `--batch` running at most).

    python -m bench.quality                      # all configs, all 280 held-out prompts
    python -m bench.quality --limit 40 --quick   # a CPU-sized run
    python -m bench.quality --precision fp8      # FP8 vs bf16 (GPU; bench/precision_quality.py)

Writes bench/results/quality.json, quality.md and quality_grid.png (or under --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from bench.flops import flop_fraction, step_flops
from bench.image_metrics import psnr, ssim
from bench.cache_settings import EXACT, CacheSetting, parse_settings
from engine.config import LATENT_AWARE_STRATEGIES, REFERENCE_MODEL_DIR, EngineConfig, read_model_defaults
from engine.engine import Engine
from engine.loader import load_pipeline
from engine.request import GenerationRequest, validate_request
from models.reference.data import held_out_prompts
from models.reference.evaluate import judge_images

LATENT_AWARE = LATENT_AWARE_STRATEGIES
FULL_CONFIGS = [EXACT] + [
    CacheSetting(policy, k, la) for policy in ("attention", "step") for k in (2, 3, 4) for la in LATENT_AWARE
]
QUICK_CONFIGS = [EXACT] + [CacheSetting(p, 3, la) for p in ("attention", "step") for la in LATENT_AWARE]
PSNR_CAP = 100.0  # identical images have infinite PSNR; JSON gets this cap


def parse_configs(text: str) -> list[CacheSetting]:
    """`policy:K:latent_aware[:wN][:fM],...` (bench/cache_settings.py)."""
    return parse_settings(text)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def requests_for(prompts, policy: str, k: int, defaults: dict) -> list[GenerationRequest]:
    return [
        validate_request(
            dict(
                prompt=p.prompt,
                seed=p.seed,
                steps=defaults["steps"],
                guidance_scale=defaults["guidance_scale"],
                width=defaults["width"],
                height=defaults["height"],
                cache_interval=k,
                cache_policy=None if policy == "exact" else policy,
                request_id=f"q{i}",
            )
        )
        for i, p in enumerate(prompts)
    ]


def run_config(pipe, base: EngineConfig, requests, setting: CacheSetting):
    """Stream `requests` through a fresh engine; return uint8 images and fresh-step counts."""
    engine = Engine(setting.engine_config(base), pipe)
    fresh: dict[str, int] = {}

    def record(report) -> None:
        fresh.update({item.request.request_id: item.fresh_steps for item in report.finished})

    images = {rid: np.asarray(image.convert("RGB")) for rid, image in engine.generate(requests, progress=record).items()}
    ids = [r.request_id for r in requests]
    return [images[i] for i in ids], [fresh[i] for i in ids], engine


def representative(prompts, most: int = 5) -> list[int]:
    """The first prompt of each shape (the caption's third word), in order."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p.prompt.split()[2], i)
    return list(first.values())[:most]


def grid(columns: list[tuple[str, list[np.ndarray]]], rows: list[int], path: Path) -> None:
    """Figure-5-style grid: one row per prompt, one column per config, labelled on top."""
    h, w = columns[0][1][0].shape[:2]
    label_h = 28
    canvas = Image.new("RGB", (w * len(columns), label_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, images) in enumerate(columns):
        for line, text in enumerate(label.split("\n")[:2]):
            draw.text((c * w + 3, 2 + 12 * line), text, fill="black")
        for r, idx in enumerate(rows):
            canvas.paste(Image.fromarray(images[idx]), (c * w, label_h + r * h))
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 keeps rounding out of the fidelity numbers")
    parser.add_argument("--batch", type=int, default=8, help="running requests at most (as a worker's max_batch)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N held-out prompts (0: all)")
    parser.add_argument("--stride", type=int, default=1, help="use every Nth held-out prompt")
    parser.add_argument("--quick", action="store_true", help="K = 3 only")
    parser.add_argument(
        "--configs",
        type=parse_configs,
        help="comma-separated policy:K:latent_aware "
        "(e.g. step:2:extrapolate2,attention:3:extrapolate); exact is always measured first",
    )
    parser.add_argument(
        "--min-fresh-per-step",
        type=int,
        choices=(0, 1),
        default=1,
        help="the FRESH budget's floor (EngineConfig.min_fresh_per_step); with --batch 1, 0 measures a lone request's caching",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp8"),
        default="bf16",
        help="fp8: FP8 against bf16 on the same seeds instead of the caching configs",
    )
    parser.add_argument(
        "--attention-precision",
        choices=("bf16", "fp8"),
        help="with --precision fp8: fp8 (its default) runs FP8 attention too (fa3-fwd, Hopper), as --precision fp8 "
        "serves there; bf16 measures the FP8 linears alone and writes quality_fp8_linears.json",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="with --precision fp8: the engines' fast path (auto: on for CUDA); off measures torchao's eager FP8",
    )
    parser.add_argument(
        "--engine-json", type=Path, help="with --precision fp8: note the result in this bench/results/engine_<card>.json"
    )
    args = parser.parse_args(argv)
    if args.attention_precision == "fp8" and args.precision != "fp8":
        parser.error("--attention-precision fp8 is measured against bf16 with --precision fp8")
    if args.attention_precision is None:
        args.attention_precision = args.precision

    defaults = read_model_defaults(args.model)
    if not defaults:
        raise SystemExit(f"error: {args.model} has no sd3serve.json; is it the reference model folder?")
    prompts = held_out_prompts()
    prompts = prompts[:: args.stride]
    if args.limit:
        prompts = prompts[: args.limit]
    if args.precision == "fp8":
        from bench.precision_quality import fp8_quality

        return fp8_quality(args, argv, prompts, requests_for(prompts, "exact", 1, defaults))
    base = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.batch,
        compile="off",
        min_fresh_per_step=args.min_fresh_per_step,
    )
    pipe = load_pipeline(base)
    device = pipe._execution_device
    configs = [FULL_CONFIGS[0]] + args.configs if args.configs else QUICK_CONFIGS if args.quick else FULL_CONFIGS
    captions = [p.prompt for p in prompts]

    rows = []
    columns = []
    exact_images: list[np.ndarray] = []
    for setting in tqdm(configs, desc="configs", unit="config"):
        policy, k, latent_aware = setting.policy, setting.k, setting.latent_aware
        config = setting.engine_config(base)
        start = time.perf_counter()
        requests = requests_for(prompts, policy, k, defaults)
        images, fresh, engine = run_config(pipe, base, requests, setting)
        seconds = time.perf_counter() - start
        if policy == "exact":
            exact_images = images
        scale = pipe.vae_scale_factor
        flops = step_flops(
            pipe.transformer.config,
            (defaults["height"] // scale, defaults["width"] // scale),
            pipe.tokenizer_max_length + engine.max_sequence_length,
        )
        fractions = [
            flop_fraction(flops, f, r.steps - f, "exact" if policy == "exact" else policy) for f, r in zip(fresh, requests)
        ]
        row = dict(
            policy=policy,
            cache_interval=k,
            latent_aware=latent_aware,
            warmup_steps=config.warmup_steps,
            final_fresh_steps=config.final_fresh_steps,
            interval_growth=config.interval_growth,
            setting=setting.name,
            judge_accuracy=judge_images(images, captions),
            ssim_vs_exact=float(np.mean([ssim(a, b) for a, b in zip(images, exact_images)])),
            psnr_vs_exact=float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(images, exact_images)])),
            flop_fraction=float(np.mean(fractions)),
            fresh_fraction=float(np.mean([f / r.steps for f, r in zip(fresh, requests)])),
            attention_share=flops.attention_share,
            seconds=round(seconds, 2),
        )
        rows.append(row)
        label = f"{policy} K={k}" + "".join(f" {letter}{value}" for letter, value in setting.options() if value is not None)
        columns.append((f"{label}\n{latent_aware}" if policy != "exact" else "exact\n", images))
        write_results(args, argv, rows, columns, prompts, defaults, device)
        tqdm.write(
            f"{setting.name:32s} acc={row['judge_accuracy']:.3f} "
            f"ssim={row['ssim_vs_exact']:.4f} psnr={row['psnr_vs_exact']:.2f} flops={row['flop_fraction']:.3f}"
        )

    result = write_results(args, argv, rows, columns, prompts, defaults, device)
    print(markdown_table(result))
    return 0


def write_results(args, argv, rows, columns, prompts, defaults, device) -> dict:
    """Write the JSON, Markdown and grid for the configs measured so far (a cut-off run keeps them)."""
    exact_accuracy = rows[0]["judge_accuracy"]
    cached = [r for r in rows if r["policy"] == "attention" and r["cache_interval"] == 3]
    best = max(cached, key=lambda r: (r["psnr_vs_exact"], r["judge_accuracy"])) if cached else None
    result = dict(
        model=Path(args.model).name,
        card=device_label(device),
        torch=torch.__version__,
        dtype=args.dtype,
        prompts=len(prompts),
        steps=defaults["steps"],
        guidance_scale=defaults["guidance_scale"],
        batch=args.batch,
        min_fresh_per_step=args.min_fresh_per_step,
        exact_accuracy=exact_accuracy,
        rows=rows,
        best_latent_aware_attention_k3=best["latent_aware"] if best else None,
        command="python -m bench.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quality.md").write_text(markdown_table(result))
    grid(columns, rows=representative(prompts), path=args.out / "quality_grid.png")
    return result


def markdown_table(result: dict) -> str:
    lines = [
        f"Reference model, {result['prompts']} held-out prompts, {result['steps']} steps, guidance "
        f"{result['guidance_scale']}, {result['dtype']} on {result['card']}; exact-path judge accuracy "
        f"{result['exact_accuracy']:.1%}.",
        "",
        "| policy | K | latent-aware | judge accuracy | SSIM vs exact | PSNR vs exact (dB) | FLOPs vs exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        p = "∞" if r["psnr_vs_exact"] >= PSNR_CAP else f"{r['psnr_vs_exact']:.2f}"
        lines.append(
            f"| {r['policy']} | {r['cache_interval']} | {r['latent_aware']} | {r['judge_accuracy']:.1%} | "
            f"{r['ssim_vs_exact']:.4f} | {p} | {r['flop_fraction']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
