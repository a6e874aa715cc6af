"""A simulated H200 serving SD3-medium jobs of 512² and 1024² through the pure scheduler, on a
simulated clock: open-loop Poisson arrivals, admission as the batching worker does it
(`admission_slots`, then `add`), measured seconds fed back through `Scheduler.observe`.

A step of b requests costs 0.01 + 0.004 b s at 512² and 0.02 + 0.036 b s at 1024² (fitted to
~30 ms for a 512² step of batch ~5 and ~380 ms for a 1024² step of batch ~10). Pure Python."""

from __future__ import annotations

import random
from collections import deque
from functools import lru_cache

from engine.fair_share import FairShare, StepCosts
from engine.request import GenerationRequest
from engine.scheduler import Scheduler

STEPS = 28


def step_seconds(size: int, batch: int) -> float:
    fixed, per_request = {512: (0.01, 0.004), 1024: (0.02, 0.036)}[size]
    return fixed + per_request * batch


def arrivals(sizes: list[int], rate: float, n: int, seed: int) -> deque[tuple[float, GenerationRequest]]:
    rng = random.Random(seed)
    out: deque[tuple[float, GenerationRequest]] = deque()
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        size = rng.choice(sizes)
        out.append((t, GenerationRequest(prompt="p", steps=STEPS, cache_interval=1, request_id=f"r{i}", width=size, height=size)))
    return out


def latencies(scheduler: Scheduler, jobs: deque[tuple[float, GenerationRequest]], now: list[float]) -> dict[int, list[float]]:
    """Seconds from arrival to the last step of each job, by size. `now[0]` is the scheduler's clock."""
    pending: deque[tuple[float, GenerationRequest]] = deque()
    arrived: dict[str, float] = {}
    out: dict[int, list[float]] = {}
    while jobs or pending or scheduler.has_work():
        while jobs and jobs[0][0] <= now[0]:
            pending.append(jobs.popleft())
        for _ in range(min(scheduler.admission_slots(), len(pending))):
            at, request = pending.popleft()
            arrived[request.request_id] = at
            scheduler.add(request)
        plan = scheduler.plan()
        if plan is None:
            if not jobs:
                raise AssertionError("the scheduler planned nothing with work waiting")
            now[0] = max(now[0], jobs[0][0])
            continue
        seconds = step_seconds(plan.key[0], len(plan.requests))
        now[0] += seconds
        for done in scheduler.complete(plan):
            out.setdefault(done.request.width, []).append(now[0] - arrived[done.request_id])
        if scheduler.step_costs is not None and plan.charge is not None:
            scheduler.observe(plan.charge, seconds)
    return out


def p95_latency(
    sizes: list[int], rate: float, share: FairShare | None = None, fair: bool = True, n: int = 240, seed: int = 7
) -> dict[int, float]:
    """p95 seconds by size of `n` jobs arriving at `rate` per second, sizes drawn evenly from
    `sizes`. `fair=False`: the scheduler counts steps (round-robin between sizes)."""
    now = [0.0]
    scheduler = Scheduler(
        max_batch=16,
        admit_per_boundary=4,
        clock=lambda: now[0],
        step_costs=StepCosts() if fair else None,
        share=share or FairShare(),
    )
    by_size = latencies(scheduler, arrivals(sizes, rate, n, seed), now)
    return {size: sorted(v)[int(0.95 * len(v))] for size, v in by_size.items()}


def mixed_vs_alone(rate: float, share: FairShare | None = None, fair: bool = True) -> dict[int, float]:
    """Each size's p95 in a half-and-half mixed run at `rate` over its p95 alone at `rate / 2`
    (the same arrival rate of that size's jobs), as bench/serving_summary.py `mixed_size_summary`."""
    alone = {size: p95_alone(size, rate / 2) for size in (512, 1024)}
    mixed = p95_latency([512, 1024], rate, share=share, fair=fair)
    return {size: mixed[size] / alone[size] for size in alone}


@lru_cache(maxsize=None)
def p95_alone(size: int, rate: float) -> float:
    return p95_latency([size], rate)[size]  # one size: the rule between sizes does not matter
