"""Sub-batches share the device fairly in seconds, not in steps (engine/fair_share.py through the
scheduler). Pure: tests/test_purity.py runs this file again with torch blocked from import.

Steps run on a simulated clock: each plan costs the seconds `cost(key, batch)` says, and the
test reports them back through `Scheduler.observe`, as the engine does with measured steps."""

from __future__ import annotations

import random
from collections import deque
from typing import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.fair_share import BatchKey, FairShare, StepCosts
from engine.request import GenerationRequest
from engine.scheduler import Scheduler, StepPlan

SMALL, LARGE = (64, 64), (128, 128)


def req(i: int, size: int, steps: int = 200) -> GenerationRequest:
    return GenerationRequest(prompt=f"p{i}", steps=steps, cache_interval=1, width=size, height=size, request_id=f"r{i}")


def timed_scheduler(**kwargs) -> Scheduler:
    return Scheduler(max_batch=16, admit_per_boundary=16, step_costs=StepCosts(), **kwargs)


def run(
    s: Scheduler, cost: Callable[[StepPlan], float], lag: int = 0, max_steps: int = 20_000
) -> Iterator[tuple[float, StepPlan, float]]:
    """Drive `s`; yield (start time, plan, seconds) per step. Measurements reach the scheduler
    `lag` steps late, as CUDA events do."""
    now = 0.0
    late: deque = deque()
    for _ in range(max_steps):
        plan = s.plan()
        if plan is None:
            return
        seconds = cost(plan)
        yield now, plan, seconds
        now += seconds
        s.complete(plan)
        late.append((plan.charge, seconds))
        while len(late) > lag:
            s.observe(*late.popleft())
    raise AssertionError("did not drain")


def per_key(seconds: dict[BatchKey, float]) -> Callable[[StepPlan], float]:
    return lambda plan: seconds[plan.key]


def test_cheap_key_gets_ten_steps_per_step_of_a_key_ten_times_dearer():
    s = timed_scheduler()
    for i in range(4):
        s.add(req(i, 64, steps=400) if i % 2 else req(i, 128, steps=100))
    keys = [plan.key for _, plan, _ in run(s, per_key({SMALL: 0.03, LARGE: 0.3}))]
    both = keys[: len(keys) - keys[::-1].index(SMALL)]  # while both sizes have work
    runs: list[int] = []  # SMALL steps between consecutive LARGE steps
    for key in both:
        if key == LARGE:
            runs.append(0)
        elif runs:
            runs[-1] += 1
    assert len(runs) > 30
    assert all(9 <= n <= 11 for n in runs[1:-1]), runs
    assert (keys.count(SMALL), keys.count(LARGE)) == (400, 100)  # nothing lost


def test_time_shares_stay_level_while_both_have_work():
    s = timed_scheduler()
    s.add(req(0, 64, steps=2000))
    s.add(req(1, 128, steps=20))
    spent = {SMALL: 0.0, LARGE: 0.0}
    for _, plan, seconds in run(s, per_key({SMALL: 0.007, LARGE: 0.5})):
        spent[plan.key] += seconds
        if plan.key == LARGE and plan.requests[0].step == 19:
            break
        assert abs(spent[SMALL] - spent[LARGE]) <= 0.5 + 0.007 + 1e-9  # one step of each


def test_before_measurements_the_estimate_is_pixels_times_rows():
    s = timed_scheduler()
    s.add(req(0, 64))
    s.add(req(1, 128))
    keys = []
    for _ in range(10):
        plan = s.plan()
        keys.append(plan.key)
        s.complete(plan)
    assert keys == [SMALL, LARGE, SMALL, SMALL, SMALL, SMALL, LARGE, SMALL, SMALL, SMALL]  # 4x the pixels


def test_a_lone_key_gets_every_step():
    s = timed_scheduler()
    s.add(req(0, 64, steps=5))
    s.add(req(1, 128, steps=40))
    keys = [plan.key for _, plan, _ in run(s, per_key({SMALL: 0.01, LARGE: 0.2}))]
    assert keys.count(SMALL) == 5
    last_small = len(keys) - 1 - keys[::-1].index(SMALL)
    assert keys[last_small + 1 :] == [LARGE] * (len(keys) - last_small - 1)  # then all of them, back to back
    assert len(keys) == 45  # and no plan came back empty meanwhile


def test_a_key_that_joins_late_starts_level_and_does_not_monopolise():
    s = timed_scheduler()
    s.add(req(0, 128, steps=300))
    steps = run(s, per_key({SMALL: 0.1, LARGE: 0.1}))
    for _ in range(100):  # LARGE alone for 10 s
        next(steps)
    s.add(req(1, 64, steps=50))
    keys = [plan.key for _, (_, plan, _) in zip(range(20), steps)]
    assert keys == [SMALL, LARGE] * 10 or keys == [LARGE, SMALL] * 10


def test_one_slow_step_counts_for_at_most_max_charge():
    s = timed_scheduler(share=FairShare(max_charge=1.0))
    s.add(req(0, 128, steps=10))
    s.add(req(1, 64, steps=400))

    def cost(plan: StepPlan) -> float:
        return 30.0 if plan.key == LARGE and plan.requests[0].step == 0 else 0.05  # a compile

    keys = [plan.key for _, plan, _ in run(s, cost)]
    first, second = keys.index(LARGE), keys.index(LARGE, keys.index(LARGE) + 1)
    assert second - first - 1 <= 1.0 / 0.05 + 1  # SMALL ran for max_charge seconds, not 30 s


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=4),
    lag=st.integers(0, 3),
    steps=st.lists(st.integers(1, 60), min_size=4, max_size=4),
    max_charge=st.floats(0.05, 3.0),
)
def test_no_key_waits_more_than_a_bounded_time(costs, lag, steps, max_charge):
    sizes = [64, 128, 192, 256][: len(costs)]
    cost_of = {(size, size): c for size, c in zip(sizes, costs)}
    s = timed_scheduler(share=FairShare(max_charge=max_charge))
    for i, size in enumerate(sizes):
        s.add(req(i, size, steps=steps[i]))
    last_end: dict[BatchKey, float] = {}
    for start, plan, seconds in run(s, per_key(cost_of), lag=lag):
        if plan.key in last_end:
            others = [c for k, c in cost_of.items() if k != plan.key]
            # Each other key runs max_charge and one step of its own, more by the estimates
            # still held (lag steps, over or under the truth).
            bound = sum((lag + 1) * (max_charge + c) + c for c in others)
            assert start - last_end[plan.key] <= bound + 1e-9
        last_end[plan.key] = start + seconds
    assert set(last_end) == set(cost_of)


def test_a_step_counting_scheduler_alternates_and_takes_no_seconds():
    s = Scheduler(max_batch=8, admit_per_boundary=8)
    for i, size in enumerate([64, 128, 192]):
        s.add(req(i, size, steps=2))
    plans = []
    while (plan := s.plan()) is not None:
        plans.append(plan)
        s.complete(plan)
    assert [p.key[0] for p in plans] == [64, 128, 192] * 2
    with pytest.raises(ValueError, match="counts steps"):
        s.observe(plans[0].charge, 0.1)


def test_bad_cost_settings_and_measurements_are_refused():
    with pytest.raises(ValueError, match="prior_rate"):
        StepCosts(prior_rate=0)
    with pytest.raises(ValueError, match="smoothing"):
        StepCosts(smoothing=1.5)
    with pytest.raises(ValueError, match="max_charge"):
        FairShare(max_charge=0)
    with pytest.raises(ValueError, match="work >= 0"):
        StepCosts().observe(SMALL, -1.0, 0.1)
    with pytest.raises(ValueError, match="seconds >= 0"):
        StepCosts().observe(SMALL, 10.0, -1.0)


def test_costs_learn_a_rate_per_key_and_lend_it_to_unmeasured_keys():
    costs = StepCosts(smoothing=0.5)
    assert costs.estimate(SMALL, 100.0) == pytest.approx(100 * costs.prior_rate)
    costs.observe(SMALL, 100.0, 1.0)
    costs.observe(LARGE, 100.0, 3.0)
    costs.observe(LARGE, 100.0, 1.0)
    assert costs.estimate(LARGE, 10.0) == pytest.approx(0.2)  # 0.03 then halfway to 0.01
    assert costs.estimate((256, 256), 10.0) == pytest.approx(0.15)  # the mean rate
    costs.reset()
    assert costs.rates == {}


def p95_latency(sizes: list[int], rate: float, fair: bool, n: int = 240) -> dict[int, float]:
    """Open-loop Poisson arrivals of 28-step requests on a simulated H200 (SD3-medium: a step of
    b requests costs 0.01 + 0.004 b s at 512², 0.02 + 0.036 b s at 1024²); p95 seconds by size."""
    rng = random.Random(7)
    arrivals, t = deque(), 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        arrivals.append(
            (
                t,
                GenerationRequest(
                    prompt="p", steps=28, cache_interval=1, request_id=f"r{i}", width=(size := rng.choice(sizes)), height=size
                ),
            )
        )
    now = [0.0]
    s = Scheduler(max_batch=16, admit_per_boundary=4, clock=lambda: now[0], step_costs=StepCosts() if fair else None)
    pending: deque = deque()
    arrived: dict[str, float] = {}
    latency: dict[int, list[float]] = {}
    while arrivals or pending or s.has_work():
        while arrivals and arrivals[0][0] <= now[0]:
            pending.append(arrivals.popleft())
        for _ in range(min(s.admission_slots(), len(pending))):
            at, request = pending.popleft()
            arrived[request.request_id] = at
            s.add(request)
        plan = s.plan()
        if plan is None:
            now[0] = arrivals[0][0]
            continue
        seconds = {512: 0.01 + 0.004 * len(plan.requests), 1024: 0.02 + 0.036 * len(plan.requests)}[plan.key[0]]
        now[0] += seconds
        for done in s.complete(plan):
            latency.setdefault(done.request.width, []).append(now[0] - arrived[done.request_id])
        if fair:
            s.observe(plan.charge, seconds)
    return {size: sorted(v)[int(0.95 * len(v))] for size, v in latency.items()}


def test_mixed_sizes_neither_starves_on_a_simulated_h200():
    rate = 0.5  # requests/s, half of each size
    alone = {size: p95_latency([size], rate / 2, fair=True)[size] for size in (512, 1024)}
    steps = p95_latency([512, 1024], rate, fair=False)
    seconds = p95_latency([512, 1024], rate, fair=True)
    assert steps[512] > 4 * alone[512]  # round-robin per step: every 512² step waits behind a 1024² one
    assert seconds[512] < 2.3 * alone[512] and seconds[1024] < 1.3 * alone[1024]
