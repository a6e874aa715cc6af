"""Measured step seconds reach the scheduler: engine/step_timer.py on the CPU and on CUDA, and the
engine's seam (plain floats into `Scheduler.observe`)."""

from __future__ import annotations

import time
from typing import cast

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import validate_request
from engine.step_timer import StepTimer


def test_cpu_steps_are_timed_by_the_host_clock():
    timer: StepTimer[str] = StepTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.05)
    timer.stop("a")
    timer.start()
    timer.stop("b")
    measured = timer.done()
    assert [tag for tag, _ in measured] == ["a", "b"]
    assert 0.05 <= measured[0][1] < 1.0 and measured[1][1] < 0.05
    assert timer.done() == []  # each step comes back once


def test_bad_timer_settings_are_refused():
    with pytest.raises(ValueError, match="max_pending"):
        StepTimer(torch.device("cpu"), max_pending=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        StepTimer(torch.device("cpu"), max_in_flight=-1)
    with pytest.raises(ValueError, match="plan_lead"):
        StepTimer(torch.device("cpu"), plan_lead=-0.01)
    with pytest.raises(ValueError, match="plan_lead"):
        StepTimer(torch.device("cpu"), plan_lead=float("nan"))
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match="PLAN_LEAD_MS|plan_lead_ms"):
            EngineConfig.from_env({"SD3SERVE_PLAN_LEAD_MS": bad})
    assert EngineConfig.from_env({"SD3SERVE_PLAN_LEAD_MS": "15"}).plan_lead_ms == 15.0
    with pytest.raises(ValueError, match="max_steps_in_flight"):
        EngineConfig(max_steps_in_flight=-1)
    assert EngineConfig.from_env({}).max_steps_in_flight == 2
    assert EngineConfig.from_env({"SD3SERVE_MAX_STEPS_IN_FLIGHT": "0"}).max_steps_in_flight == 0


class _DeviceEvent:
    """A CUDA event whose step finishes only when the host waits on it (a device far behind)."""

    waited: list[int] = []

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        self.finished = False
        self.index = -1

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        _DeviceEvent.waited.append(self.index)
        self.finished = True

    def elapsed_time(self, end: "_DeviceEvent") -> float:
        return 10.0  # ms


def _queue_steps(timer: StepTimer[int], tags: range) -> None:
    for tag in tags:
        timer.start()
        timer.stop(tag)
        cast(_DeviceEvent, timer._pending[-1].end).index = tag


@pytest.mark.parametrize("bound, waited, left", [(2, [0, 1], 1), (1, [0, 1, 2], 0), (0, [], 3)])
def test_the_host_waits_until_fewer_than_max_in_flight_steps_run(monkeypatch, bound, waited, left):
    monkeypatch.setattr(torch.cuda, "Event", _DeviceEvent)
    monkeypatch.setattr(_DeviceEvent, "waited", [])
    timer: StepTimer[int] = StepTimer(torch.device("cuda"), max_in_flight=bound)
    _queue_steps(timer, range(3))
    timer.wait_for_room()
    assert _DeviceEvent.waited == waited  # the oldest steps, oldest first
    assert timer.in_flight() == left
    assert timer.done() == [(tag, 0.01) for tag in waited]  # what the wait saw finish is measured


class _TimedEvent:
    """A CUDA event that completes at a set time on the host's clock: a device running steps of
    known length, one after another, from when the first one is queued."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        self.at = 0.0

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return time.perf_counter() >= self.at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.perf_counter()))

    def elapsed_time(self, end: "_TimedEvent") -> float:
        return 1000.0 * (end.at - self.at)


def _just_in_time_wait(monkeypatch, lengths: list[float], expected: float, plan_lead: float) -> float:
    """Queue steps of `lengths` seconds back to back (the last one `expected` long by estimate),
    then time `wait_for_room` with a bound of 2 steps."""
    monkeypatch.setattr(torch.cuda, "Event", _TimedEvent)
    timer: StepTimer[int] = StepTimer(torch.device("cuda"), max_in_flight=2, plan_lead=plan_lead)
    end = time.perf_counter()
    for tag, length in enumerate(lengths):
        timer.start()
        timer.stop(tag, expected if tag == len(lengths) - 1 else length)
        end += length
        cast(_TimedEvent, timer._pending[-1].end).at = end
    start = time.perf_counter()
    timer.wait_for_room()
    return time.perf_counter() - start


def test_behind_a_long_step_the_host_plans_just_before_it_ends(monkeypatch):
    # step 0 runs 50 ms, step 1 300 ms: the wait ends 250 ms after step 0, 50 ms before step 1 does
    waited = _just_in_time_wait(monkeypatch, [0.05, 0.3], expected=0.3, plan_lead=0.05)
    assert 0.26 <= waited < 0.33, waited


def test_a_step_that_ends_before_its_estimate_ends_the_wait(monkeypatch):
    waited = _just_in_time_wait(monkeypatch, [0.05, 0.1], expected=1.0, plan_lead=0.05)
    assert 0.14 <= waited < 0.25, waited  # at step 1's end, not 0.95 s after step 0's


@pytest.mark.parametrize("plan_lead", [0.0, 0.5])
def test_off_or_behind_a_short_step_the_host_plans_at_once(monkeypatch, plan_lead):
    # off (0), or a step expected to take less than the lead: only the wait for step 0 is left
    waited = _just_in_time_wait(monkeypatch, [0.05, 0.3], expected=0.3, plan_lead=plan_lead)
    assert 0.04 <= waited < 0.1, waited


def test_no_wait_for_a_step_whose_start_the_host_did_not_see(monkeypatch):
    """Step 0 ended before the call, so when step 1 began is unknown: no just-in-time wait."""
    monkeypatch.setattr(torch.cuda, "Event", _TimedEvent)
    timer: StepTimer[int] = StepTimer(torch.device("cuda"), max_in_flight=2, plan_lead=0.01)
    now = time.perf_counter()
    for tag, end in enumerate([now - 0.01, now + 0.3]):
        timer.start()
        timer.stop(tag, 0.3)
        cast(_TimedEvent, timer._pending[-1].end).at = end
    start = time.perf_counter()
    timer.wait_for_room()
    assert time.perf_counter() - start < 0.05 and timer.in_flight() == 1


def test_cpu_steps_never_wait():
    timer: StepTimer[str] = StepTimer(torch.device("cpu"), max_in_flight=1)
    timer.start()
    timer.stop("a")
    timer.wait_for_room()
    assert timer.in_flight() == 0 and [tag for tag, _ in timer.done()] == ["a"]


def test_the_engine_learns_each_size_s_step_cost_from_its_steps(tiny_model_dir):
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    small = validate_request(dict(prompt="a", seed=1, steps=4, width=64, height=64))
    wide = validate_request(dict(prompt="b", seed=2, steps=4, width=96, height=64))
    engine.add(small)
    engine.add(wide)
    while engine.has_work():
        engine.step()
    costs = engine.scheduler.step_costs
    assert costs is not None and set(costs.rates) == {(64, 64), (64, 96)}
    assert all(rate > 0 for rate in costs.rates.values())
    assert engine.scheduler.share.settled == {}  # both sizes done: nothing is left charged
    assert engine.step_timer.done() == []  # every step was read back


def test_a_new_request_s_prompt_encoding_is_not_charged_to_its_size_s_step(tiny_model_dir):
    """Encoding a job's prompt is that job's cost, not its sub-batch's: on the H200 (call h6) it
    was ~80 ms inside the first step of each job, which inflated its size's learned step cost
    and let the other size in."""
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    encode = engine.runner.prompts.encode

    def slow_encode(pairs):
        time.sleep(0.3)
        return encode(pairs)

    engine.runner.prompts.encode = slow_encode  # type: ignore[method-assign]
    engine.add(validate_request(dict(prompt="a", seed=1, steps=2, width=64, height=64)))
    first = engine.step()
    assert first.step_seconds >= 0.3  # the host did encode in this step ...
    assert [key for key, _ in first.measured] == [(64, 64)]
    assert first.measured[0][1] < 0.25  # ... but the step's measured cost is the forward alone
    while engine.has_work():
        engine.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_are_timed_by_events_without_waiting():
    timer: StepTimer[int] = StepTimer(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    timer.start()
    for _ in range(50):
        a = (a @ a).clamp_(-1, 1)
    timer.stop(1)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    measured = timer.done()
    assert [tag for tag, _ in measured] == [1]
    assert queued < wall  # the host did not wait for the device
    assert 0.5 * wall <= measured[0][1] <= wall * 1.05
    with pytest.raises(RuntimeError, match="without start"):
        timer.stop(2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_host_stays_within_max_in_flight_steps_of_the_device():
    timer: StepTimer[int] = StepTimer(torch.device("cuda"), max_in_flight=2)
    a = torch.randn(4096, 4096, device="cuda")
    a = (a @ a).clamp_(-1, 1)  # cuBLAS set up before anything is timed
    torch.cuda.synchronize()
    seen = []
    for step in range(8):
        timer.wait_for_room()
        seen.append(timer.in_flight())
        timer.start()
        for _ in range(50):  # ~10 ms of device work, queued in a small part of that
            a = (a @ a).clamp_(-1, 1)
        timer.stop(step)
    torch.cuda.synchronize()
    assert max(seen) <= 1, seen
    assert seen[1:].count(1) >= 6, seen  # and the device mostly had the next step queued
    assert [tag for tag, _ in timer.done()] == list(range(8))


def _left_after_planning(plan_lead: float) -> tuple[float, float]:
    """Queue two ~equal CUDA steps, wait for room as the engine does, and time what was left of
    the running step then; also the measured length of one step."""
    a = torch.randn(4096, 4096, device="cuda")
    a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    probe: StepTimer[int] = StepTimer(torch.device("cuda"))
    probe.start()
    for _ in range(20):
        a = (a @ a).clamp_(-1, 1)
    probe.stop(0)
    torch.cuda.synchronize()
    step = probe.done()[0][1]
    timer: StepTimer[int] = StepTimer(torch.device("cuda"), max_in_flight=2, plan_lead=plan_lead)
    for tag in range(2):
        timer.start()
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        timer.stop(tag, step)
    timer.wait_for_room()
    start = time.perf_counter()
    torch.cuda.synchronize()
    return time.perf_counter() - start, step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_just_in_time_planning_happens_near_the_running_step_s_end():
    left_at_start, step = _left_after_planning(0.0)
    left_just_in_time, _ = _left_after_planning(0.005)
    assert left_at_start > 0.6 * step, (left_at_start, step)  # planned as the step began
    assert left_just_in_time < 0.4 * step, (left_just_in_time, step)  # planned near its end
