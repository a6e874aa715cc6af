"""cache-dit's DBCache beside sd3serve's caching, on the same diffusers pipeline (issue 16).

cache-dit is a bench dependency, never a product one: run this from a venv that has it
(bench/README.md: `python -m venv /work/venv-cachedit`, then torch, `-e .` and `cache-dit`).
Each setting is applied the way cache-dit's users apply it, `cache_dit.enable_cache(pipe,
cache_config=DBCacheConfig(...), calibrator_config=TaylorSeerCalibratorConfig(...))`, on a freshly
loaded pipeline, and every image is one `pipe(...)` call (batch 1, CFG rows in one forward).

    # quality: the reference model, PSNR/SSIM vs the exact pipeline on the same seeds, judge
    # accuracy, and the share of transformer FLOPs DBCache skipped (cached steps x skipped blocks)
    python -m bench.cache_dit_part quality --stride 7 --out bench/results/cache_dit_cpu_stride7.json
    # speed (GPU): random weights at SD3-medium shapes, batch 1, wall clock vs diffusers exact
    python -m bench.cache_dit_part speed --out bench/results/cache_dit_speed_h200.json

A setting is `F<n>B<m>:<threshold>[:ts<order>][:w<warmup>][:c<max continuous cached>]`, e.g.
`F1B0:0.12:ts1:w4` (DBCache's Fn/Bn compute blocks, residual-diff threshold, TaylorSeer order,
warm-up steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SETTING = re.compile(r"^F(\d+)B(\d+):([0-9.]+)((?::(?:ts|w|c)\d+)*)$")
# The reference model has 6 blocks and runs 20 steps; SD3-medium has 24 and runs 28.
QUALITY_SETTINGS = (
    "F1B0:0.08:w4",
    "F1B0:0.08:ts1:w4",
    "F1B0:0.16:w4",
    "F1B0:0.16:ts1:w4",
    "F1B0:0.24:ts1:w4",
    "F1B1:0.16:ts1:w4",
    "F1B0:0.32:ts1:w4:c3",
    "F2B0:0.16:ts2:w4",
)
SPEED_SETTINGS = (
    "F8B0:0.08:w8",
    "F1B0:0.08:ts1:w8",
    "F1B0:0.12:ts1:w8",
    "F1B0:0.16:ts1:w4",
    "F4B0:0.12:ts1:w8",
    "F1B0:0.24:ts1:w4:c3",
)


@dataclass(frozen=True)
class CacheDitSetting:
    fn: int  # DBCache's Fn_compute_blocks: first blocks always computed (their residual is the signal)
    bn: int  # Bn_compute_blocks: last blocks always computed
    threshold: float  # residual_diff_threshold
    taylorseer_order: int = 0  # 0: no TaylorSeer calibrator
    warmup: int = 8  # max_warmup_steps (cache-dit's default)
    max_continuous: int = -1  # max_continuous_cached_steps (-1: no bound)

    @property
    def label(self) -> str:
        parts = [f"F{self.fn}B{self.bn}", f"{self.threshold:g}"]
        if self.taylorseer_order:
            parts.append(f"ts{self.taylorseer_order}")
        parts.append(f"w{self.warmup}")
        if self.max_continuous >= 0:
            parts.append(f"c{self.max_continuous}")
        return ":".join(parts)


def parse_setting(text: str) -> CacheDitSetting:
    match = SETTING.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: want F<n>B<m>:<threshold>[:ts<order>][:w<warmup>][:c<n>]")
    options = {m[0]: int(m[1]) for m in re.findall(r":(ts|w|c)(\d+)", match[4])}
    return CacheDitSetting(
        int(match[1]), int(match[2]), float(match[3]), options.get("ts", 0), options.get("w", 8), options.get("c", -1)
    )


def enable(pipe, setting: CacheDitSetting, steps: int, mask: list[int] | None = None):
    """cache-dit on `pipe` as its users turn it on. With `mask` (1 compute, 0 cache, a step each)
    the steps it caches are fixed (cache-dit's `steps_computation_mask`, policy "static") instead of
    decided by its residual test: the speed mode's way to time a schedule a quality run chose."""
    import cache_dit

    layers = len(pipe.transformer.transformer_blocks)
    if setting.fn + setting.bn >= layers:
        raise ValueError(f"{setting.label}: Fn + Bn must be below the model's {layers} blocks")
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=setting.fn,
        Bn_compute_blocks=setting.bn,
        residual_diff_threshold=setting.threshold,
        max_warmup_steps=setting.warmup,
        max_continuous_cached_steps=setting.max_continuous,
        num_inference_steps=steps,
        **(dict(steps_computation_mask=mask, steps_computation_policy="static") if mask is not None else {}),
    )
    # SD3's last block returns no text stream, so cache-dit never stores the text residual and its
    # encoder calibrator fails ("State 'transformer_blocks_Bn_residual' not found", cache-dit
    # 1.5.3): TaylorSeer forecasts the image stream only, which is what the text stream needs anyway.
    calibrator = (
        cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=setting.taylorseer_order, enable_encoder_calibrator=False)
        if setting.taylorseer_order
        else None
    )
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    return pipe


def cached_steps(pipe) -> int:
    """Steps of the last `pipe(...)` call on which DBCache skipped the middle blocks."""
    import cache_dit

    return len(cache_dit.summary(pipe, logging=False)[0].cached_steps)


def skipped_fraction(setting: CacheDitSetting, layers: int, cached: int, steps: int, block_share: float) -> float:
    """Share of the exact path's transformer FLOPs not spent: on a cached step every block but the
    Fn first and Bn last is skipped; `block_share` is the blocks' part of a step (bench/flops.py)."""
    return cached / steps * (layers - setting.fn - setting.bn) / layers * block_share


def generate(pipe, prompt: str, seed: int, steps: int, guidance: float, size: int, max_sequence_length: int):
    with torch.inference_mode():
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=max_sequence_length,
            output_type="np",
        )
    return (out.images[0] * 255).round().clip(0, 255).astype(np.uint8)


def quality(args) -> dict:
    from bench.flops import step_flops
    from bench.image_metrics import psnr, ssim
    from bench.quality import PSNR_CAP
    from engine.config import read_model_defaults
    from models.reference.data import held_out_prompts
    from models.reference.evaluate import judge_images, load_pipeline

    defaults = read_model_defaults(args.model)
    steps, guidance, size = defaults["steps"], defaults["guidance_scale"], defaults["width"]
    seq = defaults["max_sequence_length"]
    prompts = held_out_prompts()[:: args.stride][: args.limit or None]
    captions = [p.prompt for p in prompts]

    def images_of(pipe) -> list[np.ndarray]:
        return [generate(pipe, p.prompt, p.seed, steps, guidance, size, seq) for p in prompts]

    pipe = load_pipeline(args.model)
    config = pipe.transformer.config
    flops = step_flops(config, (size // pipe.vae_scale_factor,) * 2, pipe.tokenizer_max_length + seq)
    block_share = 1.0 - _outside_blocks(config, size // pipe.vae_scale_factor) / flops.total
    start = time.perf_counter()
    exact = images_of(pipe)
    rows = [
        dict(
            setting="exact",
            judge_accuracy=judge_images(exact, captions),
            psnr_vs_exact=PSNR_CAP,
            ssim_vs_exact=1.0,
            skipped_fraction=0.0,
            flop_fraction=1.0,
            cached_steps_mean=0.0,
            seconds=round(time.perf_counter() - start, 2),
        )
    ]
    result = dict(
        system="cache-dit",
        mode="quality",
        model=Path(args.model).name,
        prompts=len(prompts),
        stride=args.stride,
        steps=steps,
        guidance_scale=guidance,
        size=size,
        batch=1,
        cache_dit=cache_dit_version(),
        torch=torch.__version__,
        block_share=block_share,
        rows=rows,
        command=args.command,
    )
    for setting in args.settings:
        start = time.perf_counter()
        pipe = enable(load_pipeline(args.model), setting, steps)
        images, cached = [], []
        for p in prompts:
            images.append(generate(pipe, p.prompt, p.seed, steps, guidance, size, seq))
            cached.append(cached_steps(pipe))
        skipped = float(np.mean([skipped_fraction(setting, config.num_layers, c, steps, block_share) for c in cached]))
        rows.append(
            dict(
                setting=setting.label,
                **asdict(setting),
                judge_accuracy=judge_images(images, captions),
                psnr_vs_exact=float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(images, exact)])),
                ssim_vs_exact=float(np.mean([ssim(a, b) for a, b in zip(images, exact)])),
                skipped_fraction=skipped,
                flop_fraction=1.0 - skipped,
                cached_steps_mean=float(np.mean(cached)),
                seconds=round(time.perf_counter() - start, 2),
            )
        )
        r = rows[-1]
        print(
            f"{setting.label:24s} acc={r['judge_accuracy']:.3f} psnr={r['psnr_vs_exact']:.2f} "
            f"ssim={r['ssim_vs_exact']:.4f} skipped={skipped:.3f} cached={r['cached_steps_mean']:.1f}/{steps}",
            flush=True,
        )
        write(args.out, result)
        del pipe
        gc.collect()
    return result


def _outside_blocks(config, latent: int) -> float:
    """Per-row FLOPs outside the transformer blocks: patch embedding and final projection."""
    tx = (latent // config.patch_size) ** 2
    d = config.num_attention_heads * config.attention_head_dim
    return 2 * tx * d * config.patch_size**2 * config.in_channels * 2


def cache_dit_version() -> str:
    import cache_dit

    return cache_dit.__version__


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    import sys

    from engine.config import REFERENCE_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("quality", "speed"))
    parser.add_argument(
        "--settings",
        type=lambda s: [parse_setting(x) for x in s.split(",")],
        help="comma-separated settings (default: a set per mode)",
    )
    parser.add_argument("--model", default=str(REFERENCE_MODEL_DIR), help="quality: the reference model folder")
    parser.add_argument("--stride", type=int, default=7, help="quality: every Nth held-out prompt")
    parser.add_argument("--limit", type=int, default=0, help="quality: at most N prompts (0: all of the stride)")
    parser.add_argument("--random", default="sd3-medium", help="speed: random-weight shapes (engine/random_model.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed calls per setting (median)")
    parser.add_argument(
        "--cached-steps-from",
        type=Path,
        help="speed: a `quality` JSON; each setting caches as many steps as it did there (rounded mean, "
        "scaled to --steps), on a fixed schedule, since random weights make its residual test decide otherwise",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.command = "python -m bench.cache_dit_part " + " ".join(argv if argv is not None else sys.argv[1:])
    args.settings_given = args.settings is not None
    if args.settings is None:
        args.settings = [parse_setting(s) for s in (QUALITY_SETTINGS if args.mode == "quality" else SPEED_SETTINGS)]
    torch.manual_seed(0)
    if args.mode == "quality":
        quality(args)
    else:
        from bench.cache_dit_speed import speed

        speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
