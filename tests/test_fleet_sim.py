"""bench/fleet_sim.py: the fake engine keeps the engine contract `BatchWorker` uses, the fake
workers never import torch, and a short simulation with 3 fake worker processes behind a real
Redis and the real API loses nothing, finishes nothing twice, and its workers registered with RQ."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from PIL import Image

from bench.fake_engine import FakeEngine
from bench.fleet_sim import SimConfig, extrapolate, simulate
from engine.request import GenerationRequest, RequestLimits
from tests.stack_processes import ROOT


def _request(rid: str, steps: int) -> GenerationRequest:
    return GenerationRequest(prompt="p", width=64, height=64, steps=steps, seed=3, request_id=rid)


def test_fake_engine_steps_batches_and_returns_real_images():
    engine = FakeEngine(RequestLimits(), step_seconds=0.02, max_batch=3)
    assert engine.admission_slots() == 3 and not engine.has_work()
    engine.add(_request("a", 2))
    engine.add(_request("b", 3))
    engine.add(_request("c", 3))
    assert engine.admission_slots() == 0 and engine.running_ids() == ["a", "b", "c"]
    start = time.monotonic()
    first = engine.step()
    assert time.monotonic() - start >= 0.02  # a step takes the configured time
    assert first.batch_size == 3 and not first.finished and engine.progress("b") == (1, 3)
    assert engine.cancel("c") and not engine.cancel("zzz")
    second = engine.step()  # drops c first, then finishes a
    assert [r.request_id for r in second.canceled] == ["c"]
    assert [f.request.request_id for f in second.finished] == ["a"] and second.batch_size == 2
    png = io.BytesIO()
    second.finished[0].image.save(png, format="PNG")
    assert Image.open(io.BytesIO(png.getvalue())).size == (32, 32)
    assert [f.request.request_id for f in engine.step().finished] == ["b"]
    assert not engine.has_work() and engine.progress("b") is None and engine.step().batch_size == 0


def test_fake_workers_do_not_import_torch():
    code = "import sys, bench.fleet_workers, worker.batch_worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_short_simulation_loses_nothing_and_workers_register(tmp_path):
    config = SimConfig(workers=3, duration_s=6.0, step_seconds=0.05, steps=8, batch=2, size=64, register_timeout_s=30.0)
    start = time.monotonic()
    run = simulate(config, tmp_path)
    row = run["row"]
    assert time.monotonic() - start < 60
    assert row["registered_workers"] == 3
    assert row["lost"] == 0 and row["duplicates"] == 0 and row["failed"] == 0 and row["rejected"] == 0
    # Capacity is 3 x 2 / (8 x 0.05) = 15 jobs/s; a loaded 2-core machine still does a few per second.
    assert row["completed"] >= 10
    assert row["redis_ops_per_job"] > 10 and row["redis_cpu_s_per_job"] > 0 and row["api_cpu_s_per_job"] > 0
    fleet_log = (tmp_path / "fleet.log").read_text()
    assert "torch loaded: False; forking 3 fake workers" in fleet_log
    # every worker, after serving jobs, still had no torch (a GPU-memory sample would import it)
    assert fleet_log.count("exiting; torch loaded: False") == 3 and "torch loaded: True" not in fleet_log
    assert list((tmp_path / "data" / "images").glob("*.png"))  # the images went through local storage
    ex = extrapolate([row])
    assert ex["redis_core_gpus"] == round(1 / row["redis_cpu_s_per_job"] / 1.10, 1)
