"""`min_fresh_per_step`: the fractional FRESH budget's floor. With 1 (the seed paper's rule)
N <= K running requests refresh one per step, so a request running alone computes every step
and caching gives it no speed-up; with 0 (the default) each request keeps its own interval."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache_presets import CACHE_PRESETS
from engine.config import EngineConfig
from engine.request import GenerationRequest
from engine.scheduler import Scheduler
from tests.test_caching import Counter, batch, make_engine
from tests.test_fresh_schedule import requests, schedules


def lone(k: int, policy: str | None, steps: int = 28) -> list[GenerationRequest]:
    return [GenerationRequest(prompt="p", steps=steps, cache_interval=k, cache_policy=policy, request_id="r0")]


def test_the_seed_rule_refreshes_a_lone_request_every_step():
    for k, policy in ((3, "attention"), (3, "step"), (3, None), (2, None)):
        marks = schedules(Scheduler(max_batch=8, presets=CACHE_PRESETS, min_fresh_per_step=1), lone(k, policy))
        assert marks["r0"] == "F" * 28, (k, policy)


@pytest.mark.parametrize("k, policy", [(3, "attention"), (4, "step"), (3, None), (2, None)])
def test_floor_zero_gives_a_lone_request_its_own_interval(k, policy):
    s = Scheduler(max_batch=8, presets=CACHE_PRESETS, min_fresh_per_step=0)
    marks = schedules(s, lone(k, policy))["r0"]
    preset = CACHE_PRESETS.get(k) if policy is None else None
    interval = preset.interval if preset else k
    warmup = preset.warmup_steps if preset else 1
    assert marks.startswith("F" * warmup) and marks.endswith("F")
    assert "." * interval not in marks  # the staleness bound still holds
    assert marks.count("F") <= 28 // 2 + 1  # at most about every other step computes
    if preset is None:  # the literal interval: a refresh every K steps after the first
        assert marks == "".join("F" if i % k == 0 or i == 27 else "." for i in range(28))


def test_floor_zero_changes_nothing_once_n_reaches_k():
    """With N >= K requests the budget is at least one anyway: both floors plan the same steps."""
    for policy in ("attention", "step"):
        seed = schedules(Scheduler(max_batch=8, min_fresh_per_step=1), requests(4, 12, 3, policy))
        floor0 = schedules(Scheduler(max_batch=8, min_fresh_per_step=0), requests(4, 12, 3, policy))
        assert seed == floor0


def test_floor_comes_from_the_environment_and_bad_values_are_refused():
    assert EngineConfig.from_env({}).min_fresh_per_step == 0
    assert EngineConfig.from_env({"SD3SERVE_MIN_FRESH_PER_STEP": "1"}).min_fresh_per_step == 1
    with pytest.raises(ValueError, match="min_fresh_per_step"):
        EngineConfig(min_fresh_per_step=2)


@pytest.mark.parametrize("policy", ["attention", "step"])
def test_a_lone_cached_request_really_skips_attention_with_floor_zero(tiny_model_dir, monkeypatch, policy):
    layers = None
    rows_per_floor, images = {}, {}
    for floor in (1, 0):
        engine = make_engine(tiny_model_dir, min_fresh_per_step=floor)
        layers = engine.pipe.transformer.config.num_layers
        counter = Counter(engine.pipe.transformer, monkeypatch)
        [done] = engine.run(batch(3, policy, n=1, steps=9))
        rows_per_floor[floor] = (done.fresh_steps, counter.sdpa_rows)
        images[floor] = np.asarray(done.image, dtype=np.int16)
    assert rows_per_floor[1] == (9, 9 * 2 * layers)  # the seed rule: every step computes
    fresh_steps, sdpa_rows = rows_per_floor[0]
    assert fresh_steps == 4  # F..F..F.F: warm-up, every third step, the last step
    assert sdpa_rows == fresh_steps * 2 * layers  # only FRESH steps reach SDPA (2 CFG rows)
    diff = np.abs(images[0] - images[1])
    assert 0 < diff.mean() < 25  # caching changed the image, and it stayed close
