"""Sub-batches share the device fairly in seconds, not in steps (engine/fair_share.py through the
scheduler). Pure: tests/test_purity.py runs this file again with torch blocked from import.

Steps run on a simulated clock: each plan costs the seconds `cost(key, batch)` says, and the
test reports them back through `Scheduler.observe`, as the engine does with measured steps."""

from __future__ import annotations

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


def small_runs(keys: list[BatchKey]) -> list[int]:
    """SMALL steps between consecutive LARGE steps, while both sizes have work."""
    both = keys[: len(keys) - keys[::-1].index(SMALL)]
    runs: list[int] = []
    for key in both:
        if key == LARGE:
            runs.append(0)
        elif runs:
            runs[-1] += 1
    return runs


@pytest.mark.parametrize(
    ("small_steps", "max_ratio", "per_large"),
    [
        (1000, 8.0, 10),  # jobs of 30 s each: equal device seconds, 10 cheap steps per dear one
        (400, 8.0, 25),  # 12 s against 30 s: the short jobs get 2.5x the device seconds
        (400, 2.0, 20),  # capped at max_ratio
        (400, 1.0, 10),  # max_ratio 1: equal device seconds whatever the jobs
    ],
)
def test_device_seconds_are_shared_inversely_to_job_length(small_steps, max_ratio, per_large):
    s = timed_scheduler(share=FairShare(max_ratio=max_ratio))
    for i in range(4):
        s.add(req(i, 64, steps=small_steps) if i % 2 else req(i, 128, steps=100))
    keys = [plan.key for _, plan, _ in run(s, per_key({SMALL: 0.03, LARGE: 0.3}))]
    runs = small_runs(keys)
    assert len(runs) > 15
    assert all(per_large - 1 <= n <= per_large + 1 for n in runs[1:-1]), runs
    assert (keys.count(SMALL), keys.count(LARGE)) == (small_steps, 100)  # nothing lost


def test_weighted_time_shares_stay_in_ratio_while_both_have_work():
    s = timed_scheduler()
    s.add(req(0, 64, steps=2000))  # 14 s of device
    s.add(req(1, 128, steps=40))  # 20 s, 20 steps of them left when SMALL is done
    spent = {SMALL: 0.0, LARGE: 0.0}
    steps = run(s, per_key({SMALL: 0.007, LARGE: 0.5}))
    while next(steps)[1].key != LARGE:  # the first steps count at the prior estimate
        pass
    for _, plan, seconds in steps:
        spent[plan.key] += seconds
        if plan.key == SMALL and plan.requests[0].step == 1999:
            break  # LARGE is alone from here
        # SMALL's jobs are 20/14 times shorter: it gets that many times LARGE's seconds, to a step
        assert abs(spent[SMALL] - 20 / 14 * spent[LARGE]) <= 20 / 14 * 0.5 + 0.007 + 1e-9


def test_before_measurements_the_estimate_is_pixels_times_rows():
    for share, expected in [
        (FairShare(max_ratio=1), [SMALL, LARGE] + [SMALL] * 4 + [LARGE] + [SMALL] * 3),  # 4x the pixels
        (FairShare(), [SMALL, LARGE] + [SMALL] * 16 + [LARGE, SMALL]),  # and 4x the job's seconds
    ]:
        s = timed_scheduler(share=share)
        s.add(req(0, 64))
        s.add(req(1, 128))
        keys = []
        for _ in range(len(expected)):
            plan = s.plan()
            keys.append(plan.key)
            s.complete(plan)
        assert keys == expected


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
    s.add(req(1, 64, steps=300))  # jobs as long as LARGE's
    keys = [plan.key for _, (_, plan, _) in zip(range(20), steps)]
    # SMALL's first step counts at an estimate from LARGE's rate (SMALL looks 4x cheaper), then
    # the two alternate: never three steps of one key in a row
    assert 9 <= keys.count(SMALL) <= 11, keys
    assert all(len(set(keys[i : i + 3])) == 2 for i in range(len(keys) - 2)), keys


def test_a_key_with_shorter_jobs_that_joins_runs_first_and_gets_its_weight():
    s = timed_scheduler()
    s.add(req(0, 128, steps=300))  # 30 s of device
    steps = run(s, per_key({SMALL: 0.125, LARGE: 0.125}))
    for _ in range(100):
        next(steps)
    s.add(req(1, 64, steps=60))  # 7.5 s: LARGE's weight is 4
    keys = [plan.key for _, (_, plan, _) in zip(range(30), steps)]
    assert keys[0] == SMALL  # level with LARGE, and shorter
    assert 23 <= keys.count(SMALL) <= 25, keys  # 4 of every 5 steps


def test_one_slow_step_counts_for_at_most_max_charge():
    s = timed_scheduler(share=FairShare(max_charge=1.0))
    s.add(req(0, 128, steps=10))
    s.add(req(1, 64, steps=400))

    def cost(plan: StepPlan) -> float:
        return 30.0 if plan.key == LARGE and plan.requests[0].step == 0 else 0.05  # a compile

    keys = [plan.key for _, plan, _ in run(s, cost)]
    first, second = keys.index(LARGE), keys.index(LARGE, keys.index(LARGE) + 1)
    assert second - first - 1 <= 1.0 / 0.05 + 1  # SMALL ran for max_charge seconds, not 30 s


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=4),
    lag=st.integers(0, 3),
    steps=st.lists(st.integers(1, 60), min_size=4, max_size=4),
    max_charge=st.floats(0.05, 3.0),
    max_ratio=st.floats(1.0, 16.0),
)
def test_no_key_waits_more_than_a_bounded_time(costs, lag, steps, max_charge, max_ratio):
    sizes = [64, 128, 192, 256][: len(costs)]
    cost_of = {(size, size): c for size, c in zip(sizes, costs)}
    s = timed_scheduler(share=FairShare(max_charge=max_charge, max_ratio=max_ratio))
    for i, size in enumerate(sizes):
        s.add(req(i, size, steps=steps[i]))
    last_end: dict[BatchKey, float] = {}
    for start, plan, seconds in run(s, per_key(cost_of), lag=lag):
        if plan.key in last_end:
            others = [c for k, c in cost_of.items() if k != plan.key]
            # The waiting key's step counted at most max_ratio * max_charge and each step of
            # another key at least min(its seconds, max_charge): each other key runs for at most
            # max_ratio * max(max_charge, its step) and one step more, more by the estimates still
            # held (lag steps, over or under the truth).
            bound = sum((lag + 1) * (max_ratio * max(max_charge, c) + c) + c for c in others)
            assert start - last_end[plan.key] <= bound + 1e-9
        last_end[plan.key] = start + seconds
    assert set(last_end) == set(cost_of)


@settings(max_examples=100, deadline=None)
@given(
    costs=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=3),
    joins=st.lists(st.integers(0, 40), min_size=3, max_size=3),
    max_ratio=st.floats(1.0, 16.0),
)
def test_keys_that_join_late_wait_a_bounded_time_too(costs, joins, max_ratio):
    """Sizes gain work at different steps; each joiner starts below the others by their newest
    step, so the wait bound gains one such step per key."""
    sizes = [64, 128, 192][: len(costs)]
    cost_of = {(size, size): c for size, c in zip(sizes, costs)}
    s = timed_scheduler(share=FairShare(max_ratio=max_ratio))
    s.add(req(0, sizes[0], steps=60))
    late = sorted(zip(joins[1 : len(sizes)], sizes[1:]))
    last_end: dict[BatchKey, float] = {}
    for index, (start, plan, seconds) in enumerate(run(s, per_key(cost_of))):
        while late and late[0][0] <= index:
            s.add(req(index + 1000, late.pop(0)[1], steps=30))
        if plan.key in last_end:
            others = [c for k, c in cost_of.items() if k != plan.key]
            bound = sum(2 * (max_ratio * max(s.share.max_charge, c) + c) + c for c in others)
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
    with pytest.raises(ValueError, match="max_ratio must be >= 1"):
        FairShare(max_ratio=0.5)
    with pytest.raises(ValueError, match="job seconds must be >= 0"):
        FairShare().weights({SMALL: -1.0})
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
    assert costs.rates == {} and costs.recent == {}


def test_a_work_measured_before_is_estimated_by_its_own_seconds():
    """A step's fixed cost makes the rate per unit of work differ with the batch; a batch already
    measured at a key is estimated by its own (smoothed) seconds."""
    costs = StepCosts(smoothing=0.5, max_recent=2)
    costs.observe(SMALL, 100.0, 1.0)  # a batch of 1: 10 ms of fixed cost per unit
    costs.observe(SMALL, 800.0, 2.0)  # a batch of 8
    assert costs.estimate(SMALL, 100.0) == pytest.approx(1.0)  # its own seconds, not 100 x the rate
    assert costs.estimate(SMALL, 800.0) == pytest.approx(2.0)
    assert costs.estimate(SMALL, 400.0) == pytest.approx(400 * costs.rate(SMALL))  # unseen: the rate
    costs.observe(SMALL, 800.0, 3.0)
    assert costs.estimate(SMALL, 800.0) == pytest.approx(2.5)  # smoothed like the rate
    costs.observe(LARGE, 100.0, 4.0)  # a third pair: the least recently measured one goes
    assert (SMALL, 100.0) not in costs.recent and len(costs.recent) == 2


def test_weights_are_job_seconds_over_the_shortest_capped():
    share = FairShare(max_ratio=8)
    assert share.weights({SMALL: 0.5, LARGE: 2.0, (256, 256): 100.0}) == {SMALL: 1.0, LARGE: 4.0, (256, 256): 8.0}
    assert share.weights({SMALL: 0.0, LARGE: 2.0}) == {SMALL: 1.0, LARGE: 8.0}  # a zero estimate
    assert share.weights({}) == {}
