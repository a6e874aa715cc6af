"""cache-dit's wall-clock speed-up on the GPU (bench/cache_dit_part.py `speed`): random weights at
SD3-medium shapes, batch 1 (cache-dit decides per pipeline call), against diffusers exact."""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict

import numpy as np
import torch

from bench.cache_dit_part import cache_dit_version, cached_steps, enable, write


def speed(args) -> dict:
    from engine.random_model import build_pipeline

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size, steps, guidance = args.size, args.steps, 7.0
    prompt, seed = "a photo of a red boat on a lake at night", 1234

    def clock(pipe) -> tuple[float, int]:
        seconds = []
        for _ in range(args.repeats + 1):  # the first call is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=size,
                    width=size,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent",
                )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return float(np.median(seconds[1:])), (cached_steps(pipe) if pipe is not base else 0)

    base = build_pipeline(args.random, device, dtype)
    base_seconds, _ = clock(base)
    rows = [dict(setting="diffusers exact", seconds=base_seconds, speedup=1.0, cached_steps=0)]
    result = dict(
        system="cache-dit",
        mode="speed",
        model=f"random:{args.random}",
        device=str(device),
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype),
        size=size,
        steps=steps,
        guidance_scale=guidance,
        batch=1,
        repeats=args.repeats,
        cache_dit=cache_dit_version(),
        torch=torch.__version__,
        rows=rows,
        command=args.command,
        note="transformer + text encoders timed (output_type='latent': no VAE decode)",
    )
    transformer = base.transformer
    for setting in args.settings:
        # A fresh transformer per setting: cache-dit patches the one it is given.
        pipe = type(base)(**dict(base.components, transformer=copy.deepcopy(transformer)))
        pipe.set_progress_bar_config(disable=True)
        seconds, cached = clock(enable(pipe, setting, steps))
        rows.append(
            dict(setting=setting.label, **asdict(setting), seconds=seconds, speedup=base_seconds / seconds, cached_steps=cached)
        )
        print(f"{setting.label:24s} {seconds:.3f} s  x{base_seconds / seconds:.2f}  cached {cached}/{steps}", flush=True)
        write(args.out, result)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
