"""cache-dit's wall-clock speed-up on the GPU (bench/cache_dit_part.py `speed`): random weights at
SD3-medium shapes, batch 1 (cache-dit decides per pipeline call), against diffusers exact."""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict

import numpy as np
import torch

from bench.cache_dit_part import CacheDitSetting, cache_dit_version, cached_steps, enable, parse_setting, write


def forced_mask(steps: int, cached: int, warmup: int, max_continuous: int = -1) -> list[int]:
    """A step mask (1 compute, 0 cache) caching `cached` steps: the `warmup` first and the last
    step computed, the computed ones of the rest spread evenly so that no run of cached steps
    passes `max_continuous` (-1: no bound). Where they sit barely matters for speed: every cached
    step of a setting costs the same."""
    free = steps - 1 - warmup  # steps that may be cached
    if not 0 <= cached <= free:
        raise ValueError(f"{cached} cached steps do not fit {steps} steps after a warm-up of {warmup} and the last")
    computes = free - cached
    longest = -(-cached // (computes + 1)) if cached else 0  # the longest cached run, spread evenly
    if max_continuous >= 0 and longest > max_continuous:
        raise ValueError(f"{cached} cached steps in {free} need runs of {longest}, over max_continuous {max_continuous}")
    middle = [0] * free
    for j in range(computes):
        middle[round((j + 1) * (free + 1) / (computes + 1)) - 1] = 1
    return [1] * warmup + middle + [1]


def schedules_from(path, steps: int) -> dict[str, tuple[CacheDitSetting, list[int]]]:
    """setting label -> (setting, mask) from a `quality` JSON: the rounded mean of steps it cached
    there, scaled from that run's steps to `steps`."""
    import json

    data = json.loads(path.read_text())
    out = {}
    for row in data["rows"]:
        if row["setting"] == "exact":
            continue
        setting = parse_setting(row["setting"])
        cached = round(row["cached_steps_mean"] * steps / data["steps"])
        out[setting.label] = (setting, forced_mask(steps, cached, setting.warmup, setting.max_continuous))
    return out


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
    schedules = schedules_from(args.cached_steps_from, steps) if args.cached_steps_from else {}
    if schedules:
        result["schedule"] = f"forced: each setting caches the steps it cached in {args.cached_steps_from} (static)"
        if not args.settings_given:
            args.settings = [setting for setting, _ in schedules.values()]
        missing = sorted({s.label for s in args.settings} - set(schedules))
        if missing:
            raise SystemExit(f"error: {missing} not in {args.cached_steps_from}")
    transformer = base.transformer
    for setting in args.settings:
        mask = schedules[setting.label][1] if schedules else None
        # A fresh transformer per setting: cache-dit patches the one it is given.
        pipe = type(base)(**dict(base.components, transformer=copy.deepcopy(transformer)))
        pipe.set_progress_bar_config(disable=True)
        seconds, cached = clock(enable(pipe, setting, steps, mask))
        rows.append(
            dict(
                setting=setting.label,
                **asdict(setting),
                seconds=seconds,
                speedup=base_seconds / seconds,
                cached_steps=cached,
                **({"mask": "".join(map(str, mask))} if mask else {}),
            )
        )
        print(f"{setting.label:24s} {seconds:.3f} s  x{base_seconds / seconds:.2f}  cached {cached}/{steps}", flush=True)
        write(args.out, result)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
