"""Measured step seconds reach the scheduler: engine/step_timer.py on the CPU and on CUDA, and the
engine's seam (plain floats into `Scheduler.observe`)."""

from __future__ import annotations

import time

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
