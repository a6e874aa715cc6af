"""A simulated H200 serving SD3-medium jobs of 512² and 1024² through the pure scheduler:
open-loop Poisson arrivals, admission as the batching worker does it (`admission_slots`, then
`add`), measured seconds fed back through `Scheduler.observe`.

A step of b requests costs 0.001 + 0.0078 b s at 512² and 0.001 + 0.036 b s at 1024² of device
time: the H200's steps in the mixed run of call h4 (median 8.8 / 16.3 / 24.4 ms at 512² batch
1 / 2 / 3, 36.6 / 72.5 / 108 / 141 ms at 1024² batch 1-4), which also fit its batch-16 rows.

The host and the device keep clocks of their own. The host spends `host_seconds` planning and
launching a step and goes on while the device runs it. After a launch it blocks until fewer than
`max_in_flight` steps are queued (CUDA's launch queue, or engine/step_timer.py `wait_for_room`, which
the engine calls after each launch, before the worker admits jobs) and waits for
the device when a job finishes (the VAE decode copies its image out). Arrivals are admitted on
the host's clock; a step's measured seconds reach the scheduler once the device has finished it.
With `plan_lead` > 0 (engine/step_timer.py, `SD3SERVE_PLAN_LEAD_MS`) the host, having waited for
room, also waits until `plan_lead` before the running step's estimated end (the scheduler's
estimate, `StepCharge.cost`), or its end if sooner. The defaults, one step in flight and no host
time, run every step in order. Pure Python."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Mapping

from engine.fair_share import FairShare, StepCharge, StepCosts
from engine.request import GenerationRequest
from engine.scheduler import Scheduler

STEPS = 28
HOST_SECONDS = 0.004  # to plan and launch one compiled step: a small part of its device time


def step_seconds(size: int, batch: int) -> float:
    fixed, per_request = {512: (0.001, 0.0078), 1024: (0.001, 0.036)}[size]
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


@dataclass(frozen=True)
class JobCosts:
    """A job's device work besides its denoising steps, as the H200 showed it (call h6's stream):
    its prompt's encoding and the decode after its last step. `encode_mode`: "charged", inside
    its first step and counted in that step's measured seconds (before call h9); "in_step", inside
    it but timed apart (call h9); "ahead", on the prompt thread, the job admitted once it is in
    and the device not held (call h10). `step`: a step's device seconds by size and batch.
    `capture`: device seconds of a step whose forward is captured as a CUDA graph, the first time
    its size runs at that batch (`graphed`: the largest graphed batch by size) unless the warm-up
    had it (`warm`: (size, batch) pairs). `finish`: seconds from a job's decode to its client
    seeing it (PNG, storage, the API), host time only."""

    encode: float = 0.0
    encode_mode: str = "charged"
    decode: Mapping[int, float] = field(default_factory=dict)
    step: Callable[[int, int], float] = step_seconds
    capture: float = 0.0
    graphed: Mapping[int, int] = field(default_factory=dict)
    warm: frozenset[tuple[int, int]] = frozenset()
    finish: float = 0.0


@dataclass
class _Launched:
    charge: StepCharge | None
    seconds: float
    end: float  # device clock
    start: float = 0.0  # device clock
    measured: float = 0.0  # what the scheduler is told


def latencies(
    scheduler: Scheduler,
    jobs: deque[tuple[float, GenerationRequest]],
    now: list[float],
    max_in_flight: int = 1,
    host_seconds: float = 0.0,
    plan_lead: float = 0.0,
    costs: JobCosts = JobCosts(),
) -> dict[int, list[float]]:
    """Seconds from arrival to the end of each job's last step (and its decode) on the device, by
    size. `now[0]` is the host's clock, the scheduler's."""
    arrival = {request.request_id: at for at, request in jobs}
    if costs.encode and costs.encode_mode == "ahead":  # admissible once its prompt is in
        jobs = deque((at + costs.encode, request) for at, request in jobs)
    pending: deque[tuple[float, GenerationRequest]] = deque()
    captured = set(costs.warm)
    queued: deque[_Launched] = deque()
    out: dict[int, list[float]] = {}
    device_free = 0.0

    def retire(step: _Launched) -> None:
        now[0] = max(now[0], step.end)
        if scheduler.step_costs is not None and step.charge is not None:
            scheduler.observe(step.charge, step.measured)

    while jobs or pending or scheduler.has_work():
        while jobs and jobs[0][0] <= now[0]:
            pending.append(jobs.popleft())
        for _ in range(min(scheduler.admission_slots(), len(pending))):
            _, request = pending.popleft()
            scheduler.add(request)
        plan = scheduler.plan()
        if plan is None:
            if not jobs:
                raise AssertionError("the scheduler planned nothing with work waiting")
            now[0] = max(now[0], jobs[0][0])
            continue
        seconds = costs.step(plan.key[0], len(plan.requests))
        shape = (plan.key[0], len(plan.requests))
        if costs.capture and shape[1] <= costs.graphed.get(shape[0], 0) and shape not in captured:
            captured.add(shape)
            seconds += costs.capture
        encoding = costs.encode * len(plan.admitted) if costs.encode_mode != "ahead" else 0.0
        now[0] += host_seconds
        start = max(device_free, now[0])
        device_free = start + seconds + encoding
        measured = seconds + (encoding if costs.encode_mode == "charged" else 0.0)
        queued.append(_Launched(plan.charge, seconds + encoding, device_free, start, measured))
        waited = False
        while queued and (queued[0].end <= now[0] or len(queued) >= max_in_flight):
            waited = waited or queued[0].end > now[0]
            retire(queued.popleft())
        if plan_lead and waited and len(queued) == 1 and queued[0].charge is not None:
            running = queued[0]
            now[0] = max(now[0], min(running.end, running.start + running.charge.cost - plan_lead))
        finished = scheduler.complete(plan)
        if finished:  # the decode waits for every queued step
            while queued:
                retire(queued.popleft())
            device_free = now[0] = max(device_free, now[0]) + costs.decode.get(plan.key[0], 0.0) * len(finished)
        for done in finished:
            out.setdefault(done.request.width, []).append(now[0] + costs.finish - arrival[done.request_id])
    return out


def p95_by_size(by_size: Mapping[int, list[float]]) -> dict[int, float]:
    return {size: sorted(v)[int(0.95 * len(v))] for size, v in by_size.items()}


def serve(
    jobs: deque[tuple[float, GenerationRequest]],
    share: FairShare | None = None,
    fair: bool = True,
    max_in_flight: int = 1,
    host_seconds: float = 0.0,
    plan_lead: float = 0.0,
    costs: JobCosts = JobCosts(),
) -> dict[int, list[float]]:
    """`latencies` of `jobs` through a scheduler as the worker's engine has it (16 running, 4
    admitted a boundary). `fair=False`: the scheduler counts steps (round-robin between sizes)."""
    now = [0.0]
    scheduler = Scheduler(
        max_batch=16,
        admit_per_boundary=4,
        clock=lambda: now[0],
        step_costs=StepCosts() if fair else None,
        share=share or FairShare(),
    )
    return latencies(scheduler, jobs, now, max_in_flight, host_seconds, plan_lead, costs)


def p95_latency(
    sizes: list[int],
    rate: float,
    share: FairShare | None = None,
    fair: bool = True,
    max_in_flight: int = 1,
    host_seconds: float = 0.0,
    plan_lead: float = 0.0,
    n: int = 240,
    seed: int = 7,
    costs: JobCosts = JobCosts(),
) -> dict[int, float]:
    """p95 seconds by size of `n` jobs arriving at `rate` per second, sizes drawn evenly from
    `sizes`."""
    jobs = arrivals(sizes, rate, n, seed)
    return p95_by_size(serve(jobs, share, fair, max_in_flight, host_seconds, plan_lead, costs))


def mixed_vs_alone(rate: float, share: FairShare | None = None, fair: bool = True) -> dict[int, float]:
    """Each size's p95 in a half-and-half mixed run at `rate` over its p95 alone at `rate / 2`
    (the same arrival rate of that size's jobs), as bench/serving_summary.py `mixed_size_summary`."""
    alone = {size: p95_alone(size, rate / 2) for size in (512, 1024)}
    mixed = p95_latency([512, 1024], rate, share=share, fair=fair)
    return {size: mixed[size] / alone[size] for size in alone}


@lru_cache(maxsize=None)
def p95_alone(size: int, rate: float) -> float:
    return p95_latency([size], rate)[size]  # one size: the rule between sizes does not matter


def mixed_vs_alone_run_ahead(rate: float, max_in_flight: int, plan_lead: float = 0.0) -> dict[int, float]:
    """`mixed_vs_alone` with a host `HOST_SECONDS` a step that runs up to `max_in_flight` steps
    ahead of the device, in the mixed run and in the single-size runs alike."""

    def p95(sizes: list[int], at: float) -> dict[int, float]:
        return p95_latency(sizes, at, max_in_flight=max_in_flight, host_seconds=HOST_SECONDS, plan_lead=plan_lead)

    mixed = p95([512, 1024], rate)
    return {size: mixed[size] / p95([size], rate / 2)[size] for size in mixed}
