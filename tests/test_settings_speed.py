"""bench/settings_speed.py on the tiny model (CPU): the GPU speed call's rows for named caching
settings, the FRESH share each setting really ran, and the engine handed back as it was."""

from __future__ import annotations

import pytest
import torch

from bench.cache_settings import parse_setting
from bench.runs import requests
from bench.settings_speed import speed_rows, use_setting
from engine.config import EngineConfig
from engine.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", max_batch=8))


def make_requests(tag, n, setting):
    return requests(tag, n, 64, 12, k=setting.k, policy=None if setting.policy == "exact" else setting.policy)


def test_rows_time_each_setting_against_exact_and_restore_the_engine(engine):
    settings = [parse_setting("step:6:extrapolate:w3:g2"), parse_setting("step:3:extrapolate:w6:f3")]
    rows = speed_rows(engine, torch.device("cpu"), settings, make_requests, size=64, batch=4, admit=2)
    assert [r["setting"] for r in rows] == ["exact", "step:6:extrapolate:w3:g2", "step:3:extrapolate:w6:f3"]
    assert rows[0]["fresh_fraction"] == 1.0 and rows[0]["speedup_vs_exact"] == 1.0
    assert all(r["requests"] == 8 and r["batch"] == 4 and r["seconds"] > 0 for r in rows)
    growing, late = rows[1]["fresh_fraction"], rows[2]["fresh_fraction"]
    assert 0.25 < growing < late < 1.0  # 12 steps: w3 + growth skips more than w6 + the last 3
    s = engine.scheduler
    assert (s.max_batch, s.admit_per_boundary, s.warmup_steps, s.final_fresh_steps, s.interval_growth) == (8, 4, 1, 1, 0)


def test_a_deeper_history_than_the_engine_keeps_is_refused(engine):
    with pytest.raises(ValueError, match="cached refreshes"):
        use_setting(engine, parse_setting("attention:2:extrapolate2"))
    use_setting(engine, parse_setting("step:2:extrapolate2"))  # the step policy keeps velocities, not the cache
    assert engine.scheduler.extrapolation_order == 2
    use_setting(engine, parse_setting("attention:2:extrapolate"))
