"""A request's FRESH schedule under the scheduler's schedule knobs: the last `final_fresh_steps`
steps FRESH, and the CACHED-run bound growing from 2 to K (`interval_growth`). Pure: runs with
torch blocked too (tests/test_purity.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache_presets import CACHE_PRESETS
from engine.config import EngineConfig
from engine.fresh_plan import current_interval
from engine.request import GenerationRequest
from engine.scheduler import ScheduledRequest, Scheduler


def requests(n: int, steps: int, k: int, policy: str = "step") -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"p{i}", steps=steps, cache_interval=k, width=64, height=64, request_id=f"r{i}", cache_policy=policy
        )
        for i in range(n)
    ]


def schedules(s: Scheduler, reqs: list[GenerationRequest]) -> dict[str, str]:
    """Each request's steps as F (FRESH) / . (CACHED), fed as a worker feeds them."""
    pending, marks = list(reqs), {r.request_id: "" for r in reqs}
    for _ in range(10_000):
        for _ in range(min(s.admission_slots(), len(pending))):
            s.add(pending.pop(0))
        if not (pending or s.has_work()):
            return marks
        plan = s.plan()
        if plan is not None:
            for r, fresh in zip(plan.requests, plan.fresh):
                marks[r.request_id] += "F" if fresh else "."
            s.complete(plan)
    raise AssertionError("scheduler did not drain")


def test_final_steps_are_fresh():
    plain = schedules(Scheduler(max_batch=8, warmup_steps=2), requests(8, 12, 4))
    final = schedules(Scheduler(max_batch=8, warmup_steps=2, final_fresh_steps=3), requests(8, 12, 4))
    assert all(m.endswith("FFF") for m in final.values())
    assert not all(m.endswith("FFF") for m in plain.values())  # the knob, not the bound, does it
    assert all(m.startswith("FF") for m in final.values())


def test_current_interval_grows_from_two_to_k_after_the_warm_up():
    r = ScheduledRequest(requests(1, 20, 6)[0], "step", 6)
    seen = []
    for step in range(20):
        r.step = step
        seen.append(current_interval(r, warmup_steps=4, growth=2))
    assert seen == [2] * 6 + [3, 3, 4, 4, 5, 5] + [6] * 8
    assert current_interval(r, warmup_steps=4, growth=0) == 6  # off: K from the first step
    r.interval = 2
    assert current_interval(r, warmup_steps=4, growth=1) == 2


def test_growing_interval_puts_refreshes_early():
    marks = schedules(Scheduler(max_batch=8, warmup_steps=4, interval_growth=2), requests(8, 20, 8))
    plain = schedules(Scheduler(max_batch=8, warmup_steps=4), requests(8, 20, 8))
    early = sum(m[4:10].count("F") for m in marks.values())
    late = sum(m[10:19].count("F") for m in marks.values())
    assert early > late  # denser refreshes right after the warm-up than late
    assert early > sum(m[4:10].count("F") for m in plain.values())
    for m in marks.values():
        assert ".." not in m[3:6]  # steps 4 and 5: the bound is 2, a CACHED run of at most 1


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 10),
    steps=st.integers(2, 24),
    k=st.integers(2, 8),
    warmup=st.integers(0, 6),
    final=st.integers(1, 4),
    growth=st.integers(0, 4),
    policy=st.sampled_from(["step", "attention"]),
)
def test_schedule_bounds_hold(n, steps, k, warmup, final, growth, policy):
    s = Scheduler(max_batch=4, warmup_steps=warmup, final_fresh_steps=final, interval_growth=growth)
    for m in schedules(s, requests(n, steps, k, policy)).values():
        assert len(m) == steps
        assert "." * k not in m  # never more than K-1 CACHED steps in a row
        assert set(m[: max(warmup, 1)]) == {"F"}
        assert set(m[-final:]) == {"F"}


def test_cache_interval_presets_apply_only_without_a_policy():
    preset = CACHE_PRESETS[3]
    s = Scheduler(max_batch=8, presets=CACHE_PRESETS)
    asked = GenerationRequest(prompt="p", steps=20, cache_interval=3, width=64, height=64, request_id="preset")
    literal = GenerationRequest(
        prompt="p", steps=20, cache_interval=3, width=64, height=64, request_id="literal", cache_policy="attention"
    )
    beyond = GenerationRequest(prompt="p", steps=20, cache_interval=5, width=64, height=64, request_id="k5")
    for r in (asked, literal, beyond):
        s.add(r)
    s.plan()
    running = {r.request_id: r for r in s.running_requests()}
    assert (running["preset"].policy, running["preset"].interval) == (preset.policy, preset.interval)
    assert (running["preset"].warmup_steps, running["preset"].interval_growth) == (preset.warmup_steps, preset.interval_growth)
    assert (running["literal"].policy, running["literal"].interval, running["literal"].warmup_steps) == ("attention", 3, None)
    assert (running["k5"].policy, running["k5"].interval) == ("attention", 5)
    assert s.cache_bytes_of(asked, s.policy_of(asked)) == 0 or preset.policy == "attention"


def test_preset_schedule_and_boundaries_follow_the_asked_interval():
    s = Scheduler(max_batch=8, admit_per_boundary=4, presets=CACHE_PRESETS)
    reqs = [
        GenerationRequest(prompt=f"p{i}", steps=20, cache_interval=3, width=64, height=64, request_id=f"r{i}") for i in range(8)
    ]
    marks = schedules(s, reqs)
    preset = CACHE_PRESETS[3]
    for m in marks.values():
        assert set(m[: preset.warmup_steps]) == {"F"} and m.endswith("F")
        assert "." * preset.interval not in m
    assert max(len(run) for m in marks.values() for run in m.split("F")) >= 3  # the interval grew past 3
    # new requests join at boundaries of the asked interval (3 steps), not of the preset's K (6)
    s = Scheduler(max_batch=8, presets=CACHE_PRESETS)
    s.add(reqs[0])
    boundaries = []
    for _ in range(7):
        s.complete(s.plan())
        boundaries.append(s.at_boundary((64, 64)))
    assert boundaries == [False, False, True, False, False, True, False]


def test_schedule_knobs_come_from_the_environment_and_bad_values_are_refused():
    env = {"SD3SERVE_CACHE_PRESETS": "0", "SD3SERVE_INTERVAL_GROWTH": "3", "SD3SERVE_FINAL_FRESH_STEPS": "2"}
    config = EngineConfig.from_env(env)
    assert (config.cache_presets, config.interval_growth, config.final_fresh_steps) == (False, 3, 2)
    assert EngineConfig.from_env({}).cache_presets is True
    with pytest.raises(ValueError, match="final_fresh_steps"):
        EngineConfig(final_fresh_steps=0)
    with pytest.raises(ValueError, match="interval_growth"):
        EngineConfig(interval_growth=-1)
