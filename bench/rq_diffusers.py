"""The baseline a user would run instead of sd3serve: a stock RQ worker and a plain diffusers job.

Benchmark only, never part of the product. `generate` below is the ~30-line job function a user
writes: load `StableDiffusion3Pipeline` once per process, optionally apply diffusers' documented
speed-ups (fused QKV projections, `torch.compile` of the transformer and of `vae.decode`),
one `pipe(prompt)` per job, save the PNG. The stock `rq.SimpleWorker` runs it one job at a
time (a forking worker would reload the model for every job). Jobs come from the same REST API
as sd3serve's (enqueued as `worker.jobs.generate`); `UserJob` points them at this function, and
the PNG goes where the API's local storage serves it from.

    python -m bench.rq_diffusers --model random:sd3-medium --compile --warm-sizes 1024
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from redis import Redis
from rq import SimpleWorker, get_current_job
from rq.job import Job

PIPE: Any = None  # the StableDiffusion3Pipeline, once loaded
STORAGE: Any = None  # where the API's storage (SD3SERVE_STORAGE, SD3SERVE_DATA_DIR) reads images from
KEY_PREFIX = "images/"


# ---- the job function a user writes ------------------------------------------------------------
def load(model: str, compile: bool) -> StableDiffusion3Pipeline:
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    if model.startswith("random:"):  # random weights at the real shapes (no weights on the device)
        from engine.random_model import build_pipeline

        pipe = build_pipeline(model.split(":", 1)[1], torch.device(device), dtype)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
        pipe.transformer = torch.compile(pipe.transformer)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    return pipe


def generate(
    prompt: str,
    negative_prompt: str = "",
    width: int = 1024,
    height: int = 1024,
    steps: int = 28,
    guidance_scale: float = 7.0,
    seed: int = 0,
    **_ignored,
) -> dict:
    start = time.perf_counter()
    image = PIPE(
        prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    job = get_current_job()
    assert job is not None, "run by an RQ worker"
    key = f"{KEY_PREFIX}{job.id}.png"
    STORAGE.put(key, _png(image))
    return {
        "image_key": key,
        "image_url": STORAGE.url(key),
        "seed": seed,
        "width": width,
        "height": height,
        "steps": steps,
        "timings": {"generate_seconds": round(time.perf_counter() - start, 4)},
    }


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the worker process -------------------------------------------------------------------------
class UserJob(Job):
    """Runs the API's `worker.jobs.generate` jobs with the user's function above."""

    @property
    def func(self):
        return generate


def warm_up(sizes: list[int], steps: int) -> float:
    """What a user does before taking traffic with a compiled pipeline: one call per shape."""
    start = time.perf_counter()
    for size in sizes:
        for _ in range(2):
            PIPE("warm-up", width=size, height=size, num_inference_steps=steps, guidance_scale=7.0)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    global PIPE, STORAGE, KEY_PREFIX
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:sd3-medium")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warm-sizes", default="1024", help="comma-separated sides to warm up (compile) at")
    p.add_argument("--warm-steps", type=int, default=3)
    p.add_argument("--redis-url", default=os.environ.get("SD3SERVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--queue", default=os.environ.get("SD3SERVE_QUEUE", "sd3serve"))
    p.add_argument("--name", default=os.environ.get("SD3SERVE_NAME", "rq-diffusers"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from worker.storage import StorageConfig, storage_from_config

    storage_config = StorageConfig.from_env()
    STORAGE, KEY_PREFIX = storage_from_config(storage_config), storage_config.key_prefix
    STORAGE.ensure_ready()
    PIPE = load(args.model, args.compile)
    seconds = warm_up([int(s) for s in args.warm_sizes.split(",") if s], args.warm_steps)
    logging.info("warm-up (compile=%s) took %.1f s", args.compile, seconds)
    worker = SimpleWorker([args.queue], connection=Redis.from_url(args.redis_url), job_class=UserJob, name=args.name)
    worker.work(logging_level="WARNING")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
