"""tests/mixed_size_sim.py with the host and the device on clocks of their own: the host spends
`HOST_SECONDS` planning and launching a step and goes on while the device runs it. It blocks when
`max_in_flight` steps are queued (CUDA's launch queue, or the bound of engine/step_timer.py
`wait_for_room`) and waits for the device when a job finishes (the VAE decode copies its image
out). Arrivals are admitted on the host's clock; a step's measured seconds reach the scheduler
once the device has finished it. Pure Python."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.fair_share import FairShare, StepCharge, StepCosts
from engine.request import GenerationRequest
from engine.scheduler import Scheduler
from tests.mixed_size_sim import arrivals, step_seconds

HOST_SECONDS = 0.004  # to plan and launch one compiled step: a small part of its device time


@dataclass
class _Launched:
    charge: StepCharge | None
    seconds: float
    end: float  # device clock


def latencies(
    scheduler: Scheduler, jobs: deque[tuple[float, GenerationRequest]], now: list[float], max_in_flight: int
) -> dict[int, list[float]]:
    """Seconds from arrival to the end of each job's last step on the device, by size. `now[0]`
    is the host's clock, the scheduler's."""
    pending: deque[tuple[float, GenerationRequest]] = deque()
    queued: deque[_Launched] = deque()
    arrived: dict[str, float] = {}
    out: dict[int, list[float]] = {}
    device_free = 0.0

    def retire(step: _Launched) -> None:
        now[0] = max(now[0], step.end)
        if step.charge is not None:
            scheduler.observe(step.charge, step.seconds)

    while jobs or pending or scheduler.has_work():
        while jobs and jobs[0][0] <= now[0]:
            pending.append(jobs.popleft())
        for _ in range(min(scheduler.admission_slots(), len(pending))):
            at, request = pending.popleft()
            arrived[request.request_id] = at
            scheduler.add(request)
        while queued and (queued[0].end <= now[0] or len(queued) >= max_in_flight):
            retire(queued.popleft())
        plan = scheduler.plan()
        if plan is None:
            if not jobs:
                raise AssertionError("the scheduler planned nothing with work waiting")
            now[0] = max(now[0], jobs[0][0])
            continue
        seconds = step_seconds(plan.key[0], len(plan.requests))
        now[0] += HOST_SECONDS
        device_free = max(device_free, now[0]) + seconds
        queued.append(_Launched(plan.charge, seconds, device_free))
        finished = scheduler.complete(plan)
        if finished:  # the decode waits for every queued step
            while queued:
                retire(queued.popleft())
        for done in finished:
            out.setdefault(done.request.width, []).append(now[0] - arrived[done.request_id])
    return out


def p95_latency(sizes: list[int], rate: float, max_in_flight: int, n: int = 240, seed: int = 7) -> dict[int, float]:
    now = [0.0]
    scheduler = Scheduler(max_batch=16, admit_per_boundary=4, clock=lambda: now[0], step_costs=StepCosts(), share=FairShare())
    by_size = latencies(scheduler, arrivals(sizes, rate, n, seed), now, max_in_flight)
    return {size: sorted(v)[int(0.95 * len(v))] for size, v in by_size.items()}
