"""The engine's warm-up: everything a worker compiles or captures once, done before it takes jobs.

At the model's default size: the first forward and decode, cached steps (a hold and an
extrapolation, and a step where no row computes attention), the VAE decoder at one and two
images and the text encoders at one and two texts (torch specialises a batch of 1). Then at the
default size and every `EngineConfig.warm_sizes` size: an exact step at each batch whose forward
is replayed as a CUDA graph (engine/graphs.py captures a graph on a shape's first forward, ~0.25 s
on an H200: call h10 paid it inside three 512² jobs at batch 3) and the default caching (K=3)
with two requests. Minutes, once per process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from engine.request import GenerationRequest

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger("engine.engine")


def default_size_stages(engine: "Engine") -> list[tuple[str, Callable[[], object]]]:
    width, height = engine.limits.default_width, engine.limits.default_height
    warm = [
        GenerationRequest(prompt="warm-up", steps=6, seed=i, request_id=f"warm-up-{i}", width=width, height=height)
        for i in range(3)
    ]
    return [
        ("exact forward and decode", lambda: engine.generate([replace(warm[0], steps=2)])),
        # Two requests at K=2 alternate: cached steps with a hold and with extrapolation.
        ("cached steps", lambda: engine.generate([replace(r, cache_interval=2, cache_policy="attention") for r in warm[1:]])),
        # One request alone (F..F.F): steps where no row computes attention (min_fresh_per_step 0).
        ("steps with no fresh row", lambda: engine.generate([replace(warm[1], cache_interval=3, cache_policy="attention")])),
        # The prompt encoders saw a batch of two texts ("warm-up" and ""); one text is compiled apart.
        ("one text", lambda: engine.runner.prompts.encode([("warm-up: a single text", "")])),
    ]


def graph_batches(engine: "Engine", width: int, height: int) -> list[int]:
    """Request counts whose exact forward (two CFG rows each) is replayed as a graph at this size;
    without graphs, 1 and 2 (the batches torch specialises apart)."""
    graphs = engine.runner.graphs
    scale = engine.pipe.vae_scale_factor
    if graphs is None:
        return [1, 2]
    return [b for b in range(1, engine.config.max_batch + 1) if graphs.fits(2 * b, height // scale, width // scale)]


def size_stages(
    engine: "Engine", width: int, height: int, skip_batches: tuple[int, ...] = ()
) -> list[tuple[str, Callable[[], object]]]:
    def request(i: int, **fields) -> GenerationRequest:
        fields = {"steps": 2, **fields}
        return GenerationRequest(
            prompt="warm-up", seed=i, request_id=f"warm-up-{width}x{height}-{i}", width=width, height=height, **fields
        )

    stages: list[tuple[str, Callable[[], object]]] = [
        (f"{width}x{height} exact, {b} requests", lambda b=b: engine.generate([request(i) for i in range(b)]))  # type: ignore[misc]
        for b in graph_batches(engine, width, height)
        if b not in skip_batches
    ]
    cached = [request(i, steps=6, cache_interval=3, cache_policy="attention") for i in range(2)]
    stages.append((f"{width}x{height} cached K=3", lambda: engine.generate(cached)))
    return stages


def warm_up(engine: "Engine") -> float:
    """Run every stage (each logs its seconds), then forget the compiling steps' costs and freeze
    the heap. Compiles nothing when the speed work is off. Returns seconds spent."""
    speed = engine.speed
    if not (speed.compile or speed.vae_compile or speed.text_compile):
        engine.freeze_heap()
        return 0.0
    start = time.perf_counter()
    stages = default_size_stages(engine)
    default = (engine.limits.default_width, engine.limits.default_height)
    for width, height in dict.fromkeys([default, *engine.config.warm_dimensions()]):
        # one request at the default size ran in the first stage already
        stages += size_stages(engine, width, height, skip_batches=(1,) if (width, height) == default else ())
    for name, run in stages:
        began = time.perf_counter()
        run()
        log.info("warm-up: %s compiled in %.1f s", name, time.perf_counter() - began)
    engine.observe_step_costs()
    if engine.scheduler.step_costs is not None:
        engine.scheduler.step_costs.reset()  # compiling steps say nothing of serving costs
    engine.freeze_heap()
    seconds = time.perf_counter() - start
    log.info("warm-up (compiling) took %.1f s", seconds)
    return seconds
