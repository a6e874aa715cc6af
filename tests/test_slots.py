"""The scheduler's bookkeeping of attention-cache slots and refresh history (engine/slots.py,
engine/scheduler.py). No torch here: tests/test_purity.py runs this file again with torch
blocked from import."""

from __future__ import annotations

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import GenerationRequest
from engine.scheduler import Scheduler
from engine.slots import SlotTable, extrapolation_weight, extrapolation_weights


def req(
    i: int, steps: int = 10, k: int = 3, size: int = 64, policy: str | None = None, guidance: float = 5.0
) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"p{i}",
        steps=steps,
        cache_interval=k,
        width=size,
        height=size,
        request_id=f"r{i}",
        cache_policy=policy,
        guidance_scale=guidance,
    )


def test_slot_table_hands_out_the_lowest_free_slots_and_remembers_its_high_water():
    table = SlotTable(lambda key: 10 * key[0])
    assert table.allocate((1, 1), 2) == (0, 1)
    assert table.allocate((1, 1), 1) == (2,)
    assert table.allocate((2, 2), 2) == (0, 1)  # every size has its own slots
    table.free((1, 1), (0, 1))
    assert table.in_use((1, 1)) == 1 and table.capacity((1, 1)) == 3
    assert table.allocate((1, 1), 1) == (0,)  # reused, no growth
    assert table.capacity((1, 1)) == 3
    assert table.used_bytes() == 2 * 10 + 2 * 20
    assert table.allocated_bytes() == 3 * 10 + 2 * 20
    assert table.release_idle() == ()  # both sizes hold slots
    table.free((2, 2), (0, 1))
    assert table.release_idle(keep=(2, 2)) == ()  # the size running now keeps its pools
    assert table.release_idle(keep=(1, 1)) == ((2, 2),)
    assert table.capacity((2, 2)) == 0 and table.allocated_bytes() == 3 * 10
    assert table.allocate((2, 2), 1) == (0,) and table.capacity((2, 2)) == 1  # rebuilt from nothing


def _extrapolated(values: list[float], weights: tuple[float, float]) -> float:
    """a2 + (a2 - a1) * w1 + (a2 - a0) * w2 for the last three values."""
    a0, a1, a2 = values[-3:]
    return a2 + (a2 - a1) * weights[0] + (a2 - a0) * weights[1]


@pytest.mark.parametrize("times", [None, [1.0, 0.98, 0.96, 0.94, 0.9, 0.8, 0.6, 0.3, 0.0]])
def test_second_order_weights_reproduce_a_quadratic(times):
    clock = (lambda k: float(k)) if times is None else (lambda k: times[k])
    quadratic = lambda x: 3.0 - 2.0 * x + 5.0 * x * x  # noqa: E731
    refreshes = (1, 3, 4)
    values = [quadratic(clock(k)) for k in refreshes]
    for step in (5, 6, 8):
        w = extrapolation_weights(step, refreshes, 2, times)
        assert _extrapolated(values, w) == pytest.approx(quadratic(clock(step)))


def test_extrapolation_weights_drop_order_when_history_is_short():
    assert extrapolation_weights(5, (1, 3), 2) == (1.0, 0.0)  # two refreshes: linear
    assert extrapolation_weights(5, (3,), 2) == (0.0, 0.0)  # one: a hold
    assert extrapolation_weights(5, (1, 3, 4), 0) == (0.0, 0.0)  # order 0: a hold
    assert extrapolation_weights(6, (1, 3, 4), 1) == (extrapolation_weight(6, (1, 3, 4)), 0.0)
    # linear in sigma: a2 + (a2 - a1) * (s6 - s4) / (s4 - s3)
    sigmas = [1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.1]
    assert extrapolation_weights(6, (3, 4), 1, sigmas) == pytest.approx(((0.1 - 0.5) / (0.5 - 0.7), 0.0))


def test_extrapolation_weight_in_step_units():
    assert extrapolation_weight(5, ()) == 0.0
    assert extrapolation_weight(5, (3,)) == 0.0  # one refresh: a hold
    assert extrapolation_weight(5, (1, 3)) == 1.0  # a1 + (a1 - a0) * (5 - 3) / (3 - 1)
    assert extrapolation_weight(4, (0, 3)) == 1 / 3


def test_slots_are_taken_at_admission_and_given_back_at_completion_and_cancel():
    s = Scheduler(max_batch=8, admit_per_boundary=8, slot_bytes_of=lambda key: 7)
    s.add(req(0, steps=2, k=2, policy="attention"))  # CFG: two rows, two slots
    s.add(req(1, steps=4, k=2, policy="attention", guidance=1.0))  # no CFG: one slot
    s.add(req(2, steps=2, k=2, policy="step"))  # the step policy keeps no attention
    s.add(req(3, steps=2, k=1))  # exact
    plan = s.plan()
    slots = {r.request_id: r.slots for r in plan.requests}
    assert slots == {"r0": (0, 1), "r1": (2,), "r2": (), "r3": ()}
    assert plan.capacity == 3 and s.cache_bytes() == 3 * 7 == s.cache_bytes_of(req(9, policy="attention"), "attention") + 7
    s.complete(plan)
    s.complete(s.plan())  # r0, r2 and r3 finish
    assert s.cache_bytes() == 7 and s.cache_allocated_bytes() == 3 * 7
    s.add(req(4, steps=2, k=2, policy="attention"))
    plan = s.plan()
    assert {r.request_id: r.slots for r in plan.requests}["r4"] == (0, 1)  # r0's slots, reused
    assert plan.capacity == 3
    assert s.cancel("r1")
    assert [r.request_id for r in s.drop_canceled()] == ["r1"]
    assert s.cache_bytes() == 2 * 7


def test_an_idle_size_is_let_go_when_another_size_plans():
    s = Scheduler(max_batch=8, admit_per_boundary=8, slot_bytes_of=lambda key: 1)
    s.add(req(0, steps=1, k=2, size=64, policy="attention"))
    first = s.plan()
    assert first.free_pools == ()
    s.complete(first)
    assert s.cache_allocated_bytes() == 2  # idle, its pools are kept for its next requests ...
    s.add(req(1, steps=1, k=1, size=128))
    plan = s.plan()
    assert plan.key == (128, 128) and plan.free_pools == ((64, 64),)  # ... until another size runs
    assert s.cache_allocated_bytes() == 0
    s.add(req(2, steps=1, k=2, size=64, policy="attention"))
    s.complete(plan)
    assert s.trim() == () and s.plan().capacity == 2


request_specs = st.lists(
    st.tuples(
        st.integers(0, 20),
        st.integers(1, 10),
        st.integers(1, 4),
        st.sampled_from([64, 128]),
        st.sampled_from([None, "attention", "step"]),
        st.sampled_from([1.0, 5.0]),
    ),
    min_size=1,
    max_size=16,
)


@settings(max_examples=150, deadline=None)
@given(specs=request_specs, max_batch=st.integers(1, 8), cancel_every=st.integers(0, 7))
def test_planned_slots_and_refresh_history(specs, max_batch, cancel_every):
    """Whatever arrives: running `attention` requests hold distinct slots below their size's
    capacity (one per CFG row), the others none; the refresh history and every CACHED weight
    follow from the FRESH flags alone; all slots come back once the scheduler drains."""
    s = Scheduler(max_batch=max_batch, admit_per_boundary=2, slot_bytes_of=lambda key: key[0])
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i, (at, steps, k, size, policy, guidance) in enumerate(specs):
        arrivals.setdefault(at, []).append(req(i, steps, k, size, policy, guidance))
    fresh_at: dict[str, list[int]] = {}
    pending: list[GenerationRequest] = []
    it = 0
    while arrivals or pending or s.has_work():
        assert it < 5000, "scheduler did not drain"
        pending.extend(arrivals.pop(it, []))
        for _ in range(min(s.admission_slots(), len(pending))):
            s.add(pending.pop(0))
        plan = s.plan()
        if plan is not None:
            assert plan.slots == tuple(r.slots for r in plan.requests)
            held = [slot for slots in plan.slots for slot in slots]
            assert len(held) == len(set(held)) and all(slot < plan.capacity for slot in held)
            for r, fresh, weight in zip(plan.requests, plan.fresh, plan.weights):
                rows = 2 if r.request.uses_cfg else 1
                assert len(r.slots) == (rows if r.policy == "attention" else 0)
                history = fresh_at.setdefault(r.request_id, [])
                assert r.refreshes == tuple(history[-3:])
                assert r.steps_since_fresh == (r.step - history[-1] - 1 if history else r.step)
                if fresh:
                    assert weight == 0.0
                    history.append(r.step)
                else:
                    a0, a1 = history[-2:] if len(history) > 1 else (None, history[-1])
                    assert weight == (0.0 if a0 is None else (r.step - a1) / (a1 - a0))
            assert s.cache_bytes() == sum(r.request.size[0] * len(r.slots) for r in s.running_requests())
            s.complete(plan)
            if cancel_every and it % cancel_every == 0 and s.running_requests():
                s.cancel(s.running_requests()[0].request_id)
                s.drop_canceled()
        it += 1
    assert s.cache_bytes() == 0
    s.trim()
    assert s.cache_allocated_bytes() == 0
