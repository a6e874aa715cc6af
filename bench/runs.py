"""One measured generation: diffusers' pipeline as its users call it, or the sd3serve engine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from bench.measure import GIB, Run, StepClock, event_time_ms, timed
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import GenerationRequest, validate_request
from engine.scheduler import make_plan
from engine.speed import SpeedOptions

GUIDANCE = 7.0  # StableDiffusion3Pipeline's default
WORDS = ("red", "blue", "green", "circle", "square", "cat", "boat", "tree", "city", "night")
_RUNS = itertools.count()


def prompts(tag: str, n: int, unique: bool = True) -> list[str]:
    """Prompts for one run; `unique` ones never repeat, so no run is served from a prompt cache."""
    if unique:
        tag = f"{tag}{next(_RUNS)}"
    return [f"{tag} {i}: a {WORDS[i % 10]} {WORDS[(i * 3 + 1) % 10]} at {WORDS[(i * 7 + 2) % 10]}" for i in range(n)]


def requests(
    tag: str, n: int, size: int, steps: int, k: int = 1, policy: str | None = None, seed: int = 1000, unique: bool = True
) -> list[GenerationRequest]:
    """`n` requests of one size arriving together (distinct prompts and seeds)."""
    return [
        validate_request(
            dict(
                prompt=p,
                seed=seed + i,
                steps=steps,
                width=size,
                height=size,
                guidance_scale=GUIDANCE,
                cache_interval=k,
                cache_policy=policy,
            )
        )
        for i, p in enumerate(prompts(tag, n, unique))
    ]


def make_engine(pipe, device, dtype: str, max_batch: int, speed: SpeedOptions) -> Engine:
    config = EngineConfig(
        model="random-weights", device=str(device), dtype=dtype, max_batch=max_batch, admit_per_boundary=max_batch, compile="off"
    )
    return Engine(config, pipe, speed=speed)


@dataclass
class EngineRun(Run):
    fresh_ratios: list[float] = field(default_factory=list)
    peak_steps_bytes: int = 0


def run_diffusers(pipe, device, reqs: list[GenerationRequest], output_type: str = "pil"):
    """`pipe(prompts, ...)` with one CPU generator per prompt (the engine's noise); returns the
    run and the pipeline's output."""
    clock = StepClock(device)
    first = reqs[0]
    result = {}

    def go():
        result["out"] = pipe(
            prompt=[r.prompt for r in reqs],
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in reqs],
            output_type=output_type,
            callback_on_step_end=clock.mark,
        )

    return timed(device, go, clock), result["out"]


def run_engine(engine: Engine, device, reqs: list[GenerationRequest]) -> EngineRun:
    clock = StepClock(device)
    fresh: list[float] = []
    peaks: list[int] = []

    def progress(report):
        clock.mark()
        fresh.append(report.fresh_ratio)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))  # host-side counter: no sync

    run = timed(device, lambda: engine.generate(reqs, progress=progress), clock)
    return EngineRun(
        run.seconds,
        run.ms_per_step,
        run.peak_bytes,
        run.step_ms,
        run.gc_ms,
        fresh,
        peaks[-2] if len(peaks) > 1 else run.peak_bytes,
    )


def capture_latents(engine: Engine) -> dict[str, torch.Tensor]:
    """Final latents of every request the engine decodes from now on (float32, on the host);
    `del engine.runner.decode` stops it."""
    captured: dict[str, torch.Tensor] = {}
    decode = engine.runner.decode

    def decode_and_keep(ids):
        for i in ids:
            captured[i] = engine.runner.states[i].latents.float().cpu()
        return decode(ids)

    setattr(engine.runner, "decode", decode_and_keep)  # noqa: B010 - an instance attribute over the method
    return captured


def row(system: str, mode: str, model: str, size: int, batch: int, steps: int, run: Run, **extra) -> dict:
    return dict(
        system=system,
        mode=mode,
        model=model,
        size=size,
        batch=batch,
        steps=steps,
        images_per_s=round(batch / run.seconds, 4),
        seconds_per_image_latency=round(run.seconds, 4),
        ms_per_step=None if run.ms_per_step is None else round(run.ms_per_step, 2),
        peak_mem_gb=round(run.peak_bytes / GIB, 3),
        first_step_ms=round(run.step_ms[0], 1) if run.step_ms else None,
        last_step_ms=round(run.step_ms[-1], 1) if len(run.step_ms) > 1 else None,
        gc_ms=run.gc_ms,
        **extra,
    )


def step_time_all_rows(engine: Engine, device, reqs: list[GenerationRequest], fresh: bool, repeats: int = 5) -> float:
    """Milliseconds of one runner step over `reqs` with every request FRESH or every request
    CACHED (after a first, all-FRESH step has filled the caches). Leaves the engine empty."""
    for r in reqs:
        engine.add(r)
    engine.step()
    running = tuple(engine.scheduler.running_requests())
    plan = make_plan(running[0].key, running, (fresh,) * len(running), engine.scheduler.slots)
    ms = event_time_ms(device, lambda: engine.runner.run(plan), repeats=repeats, warmup=1)
    clear(engine)
    return ms


def clear(engine: Engine) -> None:
    for rid in engine.running_ids():
        engine.cancel(rid)
    while engine.scheduler.waiting:
        engine.cancel(engine.scheduler.waiting[0].request_id)
    engine.step()
