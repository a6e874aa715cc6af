"""The fast exact path (engine/speed.py) keeps results equal and compiles once, on the CPU.

torch.compile runs with the `aot_eager` backend here (dynamo tracing, graph breaks and guards
are the same as with inductor; only the kernel code generation is skipped, which takes minutes
on two cores). The graph-break count and the VAE run dynamo's `eager` backend (its tracing
alone). The GPU tests at the end run inductor on CUDA.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_pipeline
from engine.request import validate_request
from engine.fused_qkv import FusedJointProcessor, fuse_qkv
from engine.speed import LinearGeluTanh, SpeedOptions, fuse_gelu


def test_compile_setting_accepts_auto_on_off_and_booleans():
    assert EngineConfig().compile == "auto"
    for value, expected in [("on", "on"), ("OFF", "off"), ("true", "on"), ("0", "off"), (True, "on"), (False, "off")]:
        assert EngineConfig(compile=value).compile == expected
    assert EngineConfig.from_env({"SD3SERVE_COMPILE": "false"}).compile == "off"
    assert EngineConfig.from_env({"SD3SERVE_COMPILE": "1"}).compile == "on"
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        EngineConfig(compile="sometimes")
    auto = EngineConfig()
    assert auto.compile_enabled("cuda") and not auto.compile_enabled("cpu")
    assert EngineConfig(compile="on").compile_enabled("cpu")
    assert not EngineConfig(compile="off").compile_enabled("cuda")


def _transformer(**kw) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    args = dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
    )
    args.update(kw)
    return SD3Transformer2DModel(**args).eval()


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(qk_norm="rms_norm"), dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))],
    ids=["sd3", "sd3.5-qk-norm", "sd3.5-dual-attention"],
)
@pytest.mark.parametrize("split_queries", [False, True], ids=["joint-queries", "split-queries"])
def test_fused_projections_equal_separate_ones(variant, split_queries):
    model = _transformer(**variant)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(3, 16, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(3, 10, 32, generator=g),
        pooled_projections=torch.randn(3, 32, generator=g),
        timestep=torch.tensor([900.0, 500.0, 10.0]),
    )
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        fused = fuse_qkv(model, split_queries)
        gelus = fuse_gelu(model)
        out = model(**inputs, return_dict=False)[0]
    assert gelus == len([m for m in model.modules() if isinstance(m, LinearGeluTanh)]) > 3
    assert fused == len([m for m in model.modules() if isinstance(getattr(m, "processor", None), FusedJointProcessor)])
    assert fused >= 3
    assert not any(hasattr(m, "to_q") for m in model.modules() if hasattr(m, "to_qkv"))  # weights not kept twice
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _requests(n, k=1, policy=None, steps=5, size=64):
    return [
        validate_request(
            dict(
                prompt=f"prompt {i}",
                seed=50 + i,
                steps=steps,
                guidance_scale=4.0,
                width=size,
                height=size,
                cache_interval=k,
                cache_policy=policy,
            )
        )
        for i in range(n)
    ]


def _images(engine, reqs):
    out = engine.generate(reqs)
    return [np.asarray(out[r.request_id], dtype=np.int16) for r in reqs]


FAST_CPU = SpeedOptions.fast(backend="aot_eager", vae_compile=False)  # the VAE has its own test


def test_fast_path_equals_eager_and_does_not_recompile_as_the_batch_grows(tiny_model_dir):
    from torch._dynamo.utils import counters

    config = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
    eager = Engine(config, load_pipeline(config))
    fast = Engine(config, load_pipeline(config), speed=FAST_CPU)
    assert fast.speed_applied["compiled_blocks"] == 2 and fast.speed_applied["fused_attention_modules"] == 2

    reqs = _requests(2)
    for a, b in zip(_images(eager, reqs), _images(fast, reqs)):
        assert np.abs(a - b).max() <= 1
    # A cached step compiles its own (graph-broken) variant once; it must equal the eager cache.
    cached = _requests(4, k=3, policy="attention")
    for a, b in zip(_images(eager, cached), _images(fast, cached)):
        assert np.abs(a - b).max() <= 1
    # A request alone has steps where no row computes attention: that variant equals eager too.
    lone = _requests(1, k=3, policy="attention", steps=6)  # F..F.F: holds and an extrapolation
    for a, b in zip(_images(eager, lone), _images(fast, lone)):
        assert np.abs(a - b).max() <= 1

    assert fast.speed_applied["text_compiled_layers"] > 0
    fast.runner.prompts.encode([("a single text", "")])  # the text encoders at one text, as warm_up does

    graphs = counters["stats"]["unique_graphs"]
    for n in (1, 3, 5):  # batches of 2, 6 and 10 rows, exact and cached, after the warm-up
        _images(fast, _requests(n))
        _images(fast, _requests(n, k=2, policy="attention"))
    _images(fast, _requests(2, size=96))  # another image size, exact and cached
    _images(fast, _requests(2, k=2, policy="attention", size=96))
    assert counters["stats"]["unique_graphs"] == graphs, "the fast path recompiled"


def test_cached_steps_trace_into_the_compiled_blocks_without_a_graph_break(tiny_model_dir):
    """Only a step that grows a pool leaves the compiled graph; every other cached step (holds,
    extrapolations, the all-FRESH last step) runs the cache inside it.

    Graph breaks and graphs are dynamo's, decided before any backend sees a graph, so this runs
    the `eager` backend (same breaks and graph count as aot_eager, in 40 % of the time); the
    test above runs these cached steps through aot_eager."""
    from torch._dynamo.utils import counters

    config = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", max_batch=4)
    fast = Engine(config, load_pipeline(config), speed=replace(FAST_CPU, backend="eager"))
    torch._dynamo.reset()  # earlier tests may have traced these blocks already
    counters.clear()
    for request in _requests(3, k=2, policy="attention", steps=6):
        fast.add(request)
    fast.runner.prompts.wait_for_all()  # the prompt thread's first encoding compiles the text encoders
    breaks_per_step = []
    while fast.has_work():
        before = sum(counters["graph_break"].values())
        fast.step()
        breaks_per_step.append(sum(counters["graph_break"].values()) - before)
    assert breaks_per_step[0] > 0, "the first step grows the pools outside the graph"
    assert breaks_per_step[1:] == [0] * 5
    assert counters["stats"]["unique_graphs"] > 2  # the steady cached variants were compiled


def test_auto_compile_is_off_on_cpu(tiny_model_dir):
    engine = Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    assert engine.speed == SpeedOptions() and engine.speed_applied == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_cuda_matches_eager_within_bf16(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", compile="off")
    eager = Engine(config, load_pipeline(config))
    fast = Engine(config, load_pipeline(config), speed=SpeedOptions.fast())
    reqs = _requests(3)
    for a, b in zip(_images(eager, reqs), _images(fast, reqs)):
        assert np.abs(a - b).mean() < 2.0


def test_graphs_past_their_limit_run_plain_forwards():
    """A new shape when `max_graphs` graphs are held runs as a plain forward (no capture, so no
    CUDA needed here)."""
    from engine.graphs import ForwardGraphs

    model = _transformer()
    graphs = ForwardGraphs(model, max_tokens=10**6, max_graphs=0)
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 8, 8, generator=g),
        timestep=torch.tensor([900.0, 10.0]),
        encoder_hidden_states=torch.randn(2, 10, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
    )
    with torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
        assert graphs.applies(inputs["hidden_states"])
        torch.testing.assert_close(graphs(**inputs), want)
    assert not graphs.captured and not graphs.failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_equal_plain_forwards(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", compile="off")
    graphed = Engine(config, load_pipeline(config), speed=SpeedOptions.fast(vae_compile=False))
    plain = Engine(config, load_pipeline(config), speed=SpeedOptions.fast(vae_compile=False, cuda_graphs=False))
    assert plain.runner.graphs is None
    for reqs in (_requests(3), _requests(3, k=5, policy="step")):  # exact forwards of 6, 4 and 2 rows
        for a, b in zip(_images(plain, reqs), _images(graphed, reqs)):
            assert np.abs(a - b).max() <= 1
    graphs = graphed.runner.graphs
    assert not graphs.failed and len(graphs.captured) >= 2
    # Cached steps: their index buffers are refilled on each replay. The first run's first step
    # creates the pools (no graph); the second's is graphed (the pools are kept while idle); the
    # third replays only graphs captured before.
    captured, generations = [], []
    for _ in range(3):
        reqs = _requests(3, k=3, policy="attention", steps=8)
        for a, b in zip(_images(plain, reqs), _images(graphed, reqs)):
            assert np.abs(a - b).max() <= 1
        captured.append({id(e) for e in graphs.captured.values() if e.rows is not None})
        generations.append(graphed.attention.generation)
    assert not graphs.failed and len(captured[0]) >= 2
    assert generations[0] == generations[1] == generations[2]
    assert captured[0] < captured[1] == captured[2]


def test_warm_up_compiles_before_serving_and_vae_compile_keeps_images(tiny_model_dir):
    from torch._dynamo.utils import counters

    config = EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
    plain = Engine(config, load_pipeline(config))
    assert plain.warm_up() == 0.0  # no speed work: nothing to compile
    torch._dynamo.reset()  # graphs an earlier test compiled with this backend would hide what warm-up misses
    # dynamo's "eager" backend: aot_eager trips over a CPU convolution layout check in the VAE
    fast = Engine(config, load_pipeline(config), speed=SpeedOptions.fast(backend="eager"))
    assert fast.speed_applied["vae_compiled"]
    assert fast.warm_up() > 0 and not fast.has_work() and fast.cache_bytes() == 0
    graphs = counters["stats"]["unique_graphs"]
    reqs = _requests(3)
    for a, b in zip(_images(plain, reqs), _images(fast, reqs)):
        assert np.abs(a - b).max() <= 1
    _images(fast, _requests(3, k=3, policy="attention", steps=8))  # cached steps: holds, extrapolations
    _images(fast, _requests(1, k=3, policy="attention", steps=8))  # alone: steps with no FRESH row
    assert counters["stats"]["unique_graphs"] == graphs, "serving compiled something the warm-up did not"
