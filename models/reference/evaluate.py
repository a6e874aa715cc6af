"""Held-out evaluation of the reference model through diffusers' own pipeline (the exact path).

    python -m models.reference.evaluate --model models/sd3-shapes --threads 2

Generates every held-out prompt (data.held_out_prompts: 280 prompts, 22 of them combos never
trained on) at the model's serving defaults (sd3serve.json), judges each image, and times
single-image generation on this machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.config import read_model_defaults
from models.reference import data, judge


_POOL: Any = None


def _pool() -> Any:
    """One pool of judge processes for the whole run (spawned: they import numpy, not torch)."""
    global _POOL
    if _POOL is None:
        _POOL = get_context("spawn").Pool(min(16, os.cpu_count() or 1))
        atexit.register(_POOL.terminate)
    return _POOL


def judge_oks(images: Sequence[Any], captions: Sequence[str]) -> list[bool]:
    """The judge's verdict per image; in parallel where there are cores to spare."""
    items = [(judge.to_rgb_array(i).astype("uint8"), c) for i, c in zip(images, captions)]
    if (os.cpu_count() or 1) <= 2 or len(items) < 32:
        return [judge.judge_ok(x) for x in items]
    return list(_pool().map(judge.judge_ok, items, chunksize=8))


def judge_images(images: Sequence[Any], captions: Sequence[str]) -> float:
    """Fraction of images the judge passes."""
    oks = judge_oks(images, captions)
    return sum(oks) / len(oks)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    max_sequence_length: int = 8,
    batch: int = 280,
    size: int = data.IMAGE_SIZE,
) -> list:
    """Images for (prompt, seed) pairs; each seed drives its own CPU generator, as the engine does."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
        with torch.inference_mode():
            out = pipe(
                list(prompts[i : i + batch]),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                height=size,
                width=size,
                max_sequence_length=max_sequence_length,
            )
        images.extend(out.images)
    return images


def evaluate(
    pipe, prompts: Sequence[data.HeldOutPrompt], steps: int, guidance: float, max_sequence_length: int = 8, batch: int = 280
) -> dict[str, Any]:
    images = generate(pipe, [p.prompt for p in prompts], [p.seed for p in prompts], steps, guidance, max_sequence_length, batch)
    verdicts = [judge.judge(img, p.prompt) for img, p in zip(images, prompts)]
    oks = [v.ok for v in verdicts]
    unseen = [ok for ok, p in zip(oks, prompts) if p.held_out_combo]
    by_shape = {s: [v.ok for v in verdicts if v.expected[0] == s] for s in data.SHAPES}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "steps": steps,
        "guidance": guidance,
        "n": len(oks),
        "accuracy": mean(oks),
        "held_out_combos": len(unseen),
        "held_out_combo_accuracy": mean(unseen),
        "shape_accuracy": mean([v.shape_ok for v in verdicts]),
        "colour_accuracy": mean([v.colour_ok for v in verdicts]),
        "background_accuracy": mean([v.background_ok for v in verdicts]),
        "accuracy_by_shape": {s: mean(xs) for s, xs in by_shape.items()},
        "_images": images,
    }


def sweep(
    pipe,
    prompts: Sequence[data.HeldOutPrompt],
    steps: Sequence[int],
    guidances: Sequence[float],
    shifts: Sequence[float],
    max_sequence_length: int = 8,
) -> list[dict[str, Any]]:
    """Judge accuracy for each (steps, guidance, scheduler shift); restores the scheduler after."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    original = pipe.scheduler
    captions = [p.prompt for p in prompts]
    unseen = [i for i, p in enumerate(prompts) if p.held_out_combo]
    rows = []
    try:
        for shift in shifts:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=shift)
            for n in steps:
                for g in guidances:
                    imgs = generate(pipe, captions, [p.seed for p in prompts], n, g, max_sequence_length)
                    oks = judge_oks(imgs, captions)  # judged once; both accuracies come from it
                    acc = sum(oks) / len(oks)
                    acc_unseen = sum(oks[i] for i in unseen) / len(unseen) if unseen else float("nan")
                    rows.append(
                        {"steps": n, "guidance": g, "shift": shift, "accuracy": acc, "held_out_combo_accuracy": acc_unseen}
                    )
    finally:
        pipe.scheduler = original
    return rows


def seconds_per_image(pipe, steps: int, guidance: float, max_sequence_length: int, repeats: int = 5) -> float:
    """Median wall time of one 128x128 image, prompt encoding and VAE decode included."""
    times = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        generate(pipe, ["a red circle on a blue background"], [r], steps, guidance, max_sequence_length)
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])  # the first call warms up
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/sd3-shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N held-out prompts")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--steps", type=int, default=0, help="0: the model's default")
    ap.add_argument("--guidance", type=float, default=-1.0, help="<0: the model's default")
    ap.add_argument("--grid", default="", help="write a PNG grid of the first 40 images here")
    ap.add_argument("--json", default="", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    d = read_model_defaults(args.model)
    steps = args.steps or d["steps"]
    guidance = args.guidance if args.guidance >= 0 else d["guidance_scale"]
    prompts = data.held_out_prompts()
    prompts = prompts[: args.limit] if args.limit else prompts
    secs = seconds_per_image(pipe, steps, guidance, d["max_sequence_length"])
    t = time.perf_counter()
    res = evaluate(pipe, prompts, steps, guidance, d["max_sequence_length"], args.batch)
    images = res.pop("_images")
    res |= {"seconds_per_image": secs, "threads": args.threads, "eval_seconds": time.perf_counter() - t}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.grid:
        save_grid(images[:40], args.grid)


def save_grid(images: Sequence[Any], path: str, cols: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


if __name__ == "__main__":
    main()
