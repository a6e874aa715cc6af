"""The warm-up readies every size a worker is told to serve (SD3SERVE_WARM_SIZES, engine/warm_up.py):
serving those sizes afterwards compiles nothing and captures no CUDA graph."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_pipeline
from engine.request import validate_request
from engine.speed import SpeedOptions


def test_warm_sizes_come_from_the_environment_and_bad_ones_are_refused_by_name(tiny_model_dir):
    config = EngineConfig.from_env({"SD3SERVE_WARM_SIZES": "512, 768x512"})
    assert config.warm_sizes == ("512", "768x512") and config.warm_dimensions() == [(512, 512), (768, 512)]
    assert EngineConfig.from_env({}).warm_dimensions() == []
    for bad in ("big", "0", "512x", "1x2x3", "-64"):
        with pytest.raises(ValueError, match="warm_sizes.*SD3SERVE_WARM_SIZES"):
            EngineConfig.from_env({"SD3SERVE_WARM_SIZES": bad})
    unservable = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", warm_sizes=("72",))
    with pytest.raises(ValueError, match=r"SD3SERVE_WARM_SIZES.*72x72.*multiple of 16"):
        Engine(unservable, load_pipeline(unservable))


def _requests(n: int, width: int, height: int, tag: str, **fields):
    return [
        validate_request(dict(prompt=f"{tag} {i}", seed=i, steps=4, guidance_scale=4.0, width=width, height=height, **fields))
        for i in range(n)
    ]


def test_the_warm_up_runs_each_warm_size_s_batches_and_serving_them_compiles_nothing(tiny_model_dir, caplog):
    from torch._dynamo.utils import counters

    config = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", warm_sizes=("96x64",))
    torch._dynamo.reset()
    engine = Engine(config, load_pipeline(config), speed=SpeedOptions.fast(backend="eager", vae_compile=False))
    with caplog.at_level(logging.INFO, logger="engine.engine"):
        assert engine.warm_up() > 0
    stages = " | ".join(r.getMessage() for r in caplog.records)
    for stage in ("96x64 exact, 1 requests", "96x64 exact, 2 requests", "96x64 cached K=3", "64x64 exact, 2 requests"):
        assert f"warm-up: {stage} compiled" in stages, stages
    graphs = counters["stats"]["unique_graphs"]
    engine.generate(_requests(3, 96, 64, "serve"))
    engine.generate(_requests(2, 96, 64, "cached", cache_interval=3, cache_policy="attention"))
    assert counters["stats"]["unique_graphs"] == graphs, "serving a warm size compiled what the warm-up did not"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_warm_size_s_small_batches_are_captured_before_serving(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", max_batch=4, warm_sizes=("96",))
    engine = Engine(config, load_pipeline(config), speed=SpeedOptions.fast(vae_compile=False))
    engine.warm_up()
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.failed
    exact = {key for key, entry in graphs.captured.items() if entry.rows is None}
    for batch in (1, 3, 4):
        engine.generate(_requests(batch, 96, 96, f"serve {batch}"))
    assert {key for key, entry in graphs.captured.items() if entry.rows is None} == exact  # replays only
