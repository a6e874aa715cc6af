"""The pure scheduler: admission, sub-batches and the FRESH/CACHED plan. No torch here:
tests/test_purity.py runs this file again with torch blocked from import."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import GenerationRequest
from engine.scheduler import ScheduledRequest, Scheduler, forced_fresh, fresh_budget


def req(i: int, steps: int = 10, k: int = 3, size: int = 64, policy: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"p{i}", steps=steps, cache_interval=k, width=size, height=size, request_id=f"r{i}", cache_policy=policy
    )


def drain(s: Scheduler, arrivals: dict[int, list[GenerationRequest]], max_iters: int = 10_000):
    """Run the scheduler as the worker does; yield (iteration, plan, forced flags)."""
    pending: list[GenerationRequest] = []
    it = 0
    while (arrivals or pending or s.has_work()) and it < max_iters:
        pending.extend(arrivals.pop(it, []))
        for _ in range(min(s.admission_slots(), len(pending))):
            s.add(pending.pop(0))
        plan = s.plan()
        if plan is not None:
            forced = [forced_fresh(r, s.warmup_steps) for r in plan.requests]
            yield it, plan, forced
            s.complete(plan)
        it += 1
    assert it < max_iters, "scheduler did not drain"


request_specs = st.lists(
    st.tuples(
        st.integers(0, 30),  # arrival iteration
        st.integers(1, 12),  # steps
        st.integers(1, 4),  # K
        st.sampled_from([64, 128]),  # size
        st.sampled_from([None, "attention", "step"]),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(specs=request_specs, max_batch=st.integers(1, 8), per_boundary=st.integers(1, 4), warmup=st.integers(0, 3))
def test_plan_properties(specs, max_batch, per_boundary, warmup):
    s = Scheduler(max_batch=max_batch, admit_per_boundary=per_boundary, warmup_steps=warmup)
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i, (at, steps, k, size, policy) in enumerate(specs):
        arrivals.setdefault(at, []).append(req(i, steps, k, size, policy))
    since_fresh: dict[str, int] = {}
    steps_done: dict[str, int] = {}
    fresh_history: dict[str, list[bool]] = {}
    for _, plan, forced in drain(s, arrivals):
        assert len({r.key for r in plan.requests}) == 1  # one size per forward
        assert len(plan.requests) <= max_batch
        n_fresh = sum(plan.fresh)
        # At most ceil(sum 1/K) FRESH, unless more are forced.
        assert n_fresh <= max(fresh_budget(list(plan.requests)), sum(forced))
        for r, fresh, must in zip(plan.requests, plan.fresh, forced):
            rid = r.request_id
            if must:
                assert fresh
            if r.step == 0:
                assert fresh, "a new request computes attention"
            if r.step == r.total - 1:
                assert fresh, "the last step is FRESH"
            if r.step < warmup:
                assert fresh
            assert steps_done.get(rid, 0) == r.step
            steps_done[rid] = r.step + 1
            since_fresh[rid] = 0 if fresh else since_fresh.get(rid, 0) + 1
            assert since_fresh[rid] <= r.interval - 1, "no request goes K-1 steps without a refresh"
            fresh_history.setdefault(rid, []).append(fresh)
    # Every request ran all its steps exactly once: none lost.
    assert steps_done == {f"r{i}": spec[1] for i, spec in enumerate(specs)}


def test_one_fresh_per_step_when_n_le_k():
    """N <= K past warm-up: exactly one request computes attention per step."""
    s = Scheduler(max_batch=4, admit_per_boundary=1, warmup_steps=1)
    arrivals = {0: [req(i, steps=40, k=4) for i in range(4)]}
    counts = []
    for _, plan, _ in drain(s, arrivals):
        settled = all(0 < r.step < r.total - 1 for r in plan.requests)
        if len(plan.requests) == 4 and settled:
            counts.append(sum(plan.fresh))
    assert counts and set(counts) == {1}


def test_progressive_admission_at_chunk_boundaries():
    s = Scheduler(max_batch=16, admit_per_boundary=2, warmup_steps=1)
    arrivals = {0: [req(i, steps=30, k=3) for i in range(8)]}
    sizes = []
    for it, plan, _ in drain(s, arrivals):
        sizes.append((it, len(plan.requests), len(plan.admitted)))
    admitted_at = [it for it, _, n in sizes if n]
    assert all(it % 3 == 0 for it in admitted_at)  # boundaries of K = 3 steps
    assert [n for _, _, n in sizes if n] == [2, 2, 2, 2]  # bounded per boundary
    grow = [n for _, n, _ in sizes[:10]]
    assert grow == sorted(grow) and grow[0] == 2 and max(grow) == 8


def test_refresh_phases_spread_evenly():
    s = Scheduler(max_batch=16, admit_per_boundary=1, warmup_steps=1)
    arrivals = {0: [req(i, steps=60, k=3) for i in range(6)]}
    steady = []
    for _, plan, _ in drain(s, arrivals):
        if len(plan.requests) == 6 and all(r.step > 2 and r.step < r.total - 1 for r in plan.requests):
            steady.append(sum(plan.fresh))
    assert steady and set(steady) == {2}  # ceil(6 / 3)


def test_exact_requests_always_fresh_and_admitted_every_step():
    s = Scheduler(max_batch=8, admit_per_boundary=1)
    arrivals = {0: [req(i, steps=5, k=1) for i in range(3)]}
    admitted = []
    for it, plan, _ in drain(s, arrivals):
        assert all(plan.fresh)
        admitted += [it] * len(plan.admitted)
    assert admitted == [0, 1, 2]


def test_sub_batches_alternate_fairly():
    s = Scheduler(max_batch=8, admit_per_boundary=4)
    arrivals = {0: [req(0, steps=3, k=1, size=64), req(1, steps=3, k=1, size=128)]}
    keys = [plan.key for _, plan, _ in drain(s, arrivals)]
    assert keys == [(64, 64), (128, 128)] * 3


def test_admission_slots_and_capacity():
    s = Scheduler(max_batch=3, admit_per_boundary=2)
    assert s.admission_slots() == 2
    for i in range(2):
        s.add(req(i, k=3))
    assert s.admission_slots() == 1  # two are waiting, capacity three
    s.plan()
    assert s.num_running() == 2
    s.add(req(2, k=3))
    assert s.admission_slots() == 0


def test_cancel_waiting_and_running():
    s = Scheduler(max_batch=4)
    s.add(req(0))
    s.add(req(1))
    assert s.cancel("r0")
    plan = s.plan()
    assert [r.request_id for r in plan.requests] == ["r1"]
    s.complete(plan)
    assert s.cancel("r1")
    assert [r.request_id for r in s.drop_canceled()] == ["r1"]
    assert not s.has_work()
    assert not s.cancel("nope")


def test_cache_budget_limits_admission():
    s = Scheduler(
        max_batch=8, admit_per_boundary=8, cache_budget_bytes=250, slot_bytes_of=lambda key: 50
    )  # a CFG request of the `attention` policy: two slots
    for i in range(3):
        s.add(req(i, k=2))
    s.add(req(9, k=1))  # exact: needs no cache
    plan = s.plan()
    assert {r.request_id for r in plan.requests} == {"r0", "r1", "r9"}
    assert len(s.waiting) == 1
    too_big = Scheduler(cache_budget_bytes=50, slot_bytes_of=lambda key: 50)
    try:
        too_big.add(req(5, k=2))
    except ValueError as exc:
        assert "budget" in str(exc)
    else:
        raise AssertionError("a request larger than the whole budget must be refused")


def test_budget_formula():
    reqs = [ScheduledRequest(req(i), "attention", 3) for i in range(7)]
    assert fresh_budget(reqs) == math.ceil(7 / 3)


def steady_fresh_counts(n: int, k: int, steps: int = 90, **scheduler_args) -> list[int]:
    s = Scheduler(max_batch=16, admit_per_boundary=16, warmup_steps=1, **scheduler_args)
    counts = []
    for _, plan, _ in drain(s, {0: [req(i, steps=steps, k=k) for i in range(n)]}):
        if all(0 < r.step < r.total - 1 for r in plan.requests):
            counts.append(sum(plan.fresh))
    return counts


def test_fractional_budget_averages_n_over_k():
    """4 requests at K=3 refresh 4/3 per step on average (1, 1, 2, ...), not ceil(4/3) = 2."""
    counts = steady_fresh_counts(4, 3)
    assert set(counts) == {1, 2}
    assert abs(sum(counts) / len(counts) - 4 / 3) < 0.05
    assert steady_fresh_counts(4, 3, fractional_budget=False) == [2] * len(counts)  # the plain ceiling


def test_fractional_budget_at_several_sizes():
    for n, k in [(8, 3), (8, 5), (16, 3), (5, 2), (7, 4)]:
        counts = steady_fresh_counts(n, k)
        assert max(counts) <= math.ceil(n / k), (n, k)
        assert abs(sum(counts) / len(counts) - n / k) < 0.1, (n, k, counts)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), k=st.integers(1, 6))
def test_fractional_budget_keeps_every_bound(n, k):
    seed_rule = steady_fresh_counts(n, k, steps=30, min_fresh_per_step=1)
    assert all(1 <= c <= math.ceil(n / k) for c in seed_rule)
    if n <= k:
        assert set(seed_rule) <= {1}  # the seed paper's rule: exactly one per step
    own_intervals = steady_fresh_counts(n, k, steps=30)  # the default floor, 0
    assert all(0 <= c <= math.ceil(n / k) for c in own_intervals)
    if n >= k:
        assert own_intervals == seed_rule  # the floor only matters while N < K


def test_a_large_request_blocked_by_the_cache_budget_is_not_starved_by_smaller_ones():
    # 64² costs 2 bytes (two CFG rows), 128² costs 4; the budget holds two 64² or one 128².
    s = Scheduler(max_batch=16, admit_per_boundary=4, cache_budget_bytes=5, slot_bytes_of=lambda key: key[0] // 64)
    large_admitted_at = None
    for step in range(200):
        if step % 5 == 0:  # 10-step 64² requests every 5 steps: one or two run at all times
            s.add(req(100 + step, steps=10, k=2, size=64))
        if step == 6:
            s.add(req(1, steps=10, k=2, size=128))
        plan = s.plan()
        if any(r.request_id == "r1" for r in s.running_requests()):
            large_admitted_at = step
            break
        s.complete(plan)
        assert s.cache_bytes() <= 5
    # Memory freed after it waits is kept for it: it runs once the two 64² before it are done.
    assert large_admitted_at == 16
