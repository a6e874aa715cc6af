"""Attention caching, the `step` policy and latent-aware rules on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import diffusers.models.attention_processor as attention_processor

from engine.config import LATENT_AWARE_STRATEGIES, EngineConfig
from engine.engine import Engine
from engine.latent_aware import SeedRule, seed_edge, seed_sigma_tilde
from engine.request import validate_request


def make_engine(model_dir, **overrides) -> Engine:
    return Engine.from_config(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", **overrides))


def run_all(engine, requests):
    images = engine.generate(requests)
    return [np.asarray(images[r.request_id], dtype=np.int16) for r in requests]


def batch(k: int, policy: str | None = None, n: int = 3, steps: int = 8):
    return [
        validate_request(
            dict(
                prompt=f"prompt {i}",
                seed=100 + i,
                steps=steps,
                guidance_scale=4.0,
                width=64,
                height=64,
                cache_interval=k,
                cache_policy=policy,
            )
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("latent_aware", LATENT_AWARE_STRATEGIES)
def test_k1_is_exactly_the_exact_path(tiny_model_dir, latent_aware):
    exact = run_all(make_engine(tiny_model_dir), batch(1))
    with_cache_machinery = run_all(make_engine(tiny_model_dir, latent_aware=latent_aware), batch(1, "attention"))
    for a, b in zip(exact, with_cache_machinery):
        assert np.array_equal(a, b)


class Counter:
    """Counts the rows entering Q/K/V projections and SDPA."""

    def __init__(self, transformer, monkeypatch):
        self.qkv_rows = 0
        self.sdpa_rows = 0
        self.active = False  # count only inside the transformer (the text encoders use SDPA too)
        real_sdpa = attention_processor.F.scaled_dot_product_attention

        def counting_sdpa(query, *args, **kwargs):
            if self.active:
                self.sdpa_rows += query.shape[0]
            return real_sdpa(query, *args, **kwargs)

        transformer.register_forward_pre_hook(lambda m, a: setattr(self, "active", True))
        transformer.register_forward_hook(lambda m, a, o: setattr(self, "active", False))

        monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", counting_sdpa)
        for name, module in transformer.named_modules():
            if name.endswith(("attn.to_q", "attn.add_q_proj")):
                module.register_forward_hook(lambda m, inp, out: setattr(self, "qkv_rows", self.qkv_rows + inp[0].shape[0]))


def test_cached_rows_skip_attention(tiny_model_dir, monkeypatch):
    engine = make_engine(tiny_model_dir, warmup_steps=1)
    counter = Counter(engine.pipe.transformer, monkeypatch)
    layers = engine.pipe.transformer.config.num_layers
    requests = batch(3, "attention", n=3, steps=9)
    for r in requests:
        engine.add(r)
    fresh_rows_seen = []
    while engine.has_work():
        before = (counter.qkv_rows, counter.sdpa_rows)
        report = engine.step()
        # each FRESH request has two rows (CFG); 2 streams hit the to_q / add_q_proj hooks
        fresh_rows = round(report.fresh_ratio * report.batch_size) * 2
        fresh_rows_seen.append(fresh_rows)
        assert counter.sdpa_rows - before[1] == fresh_rows * layers
        assert counter.qkv_rows - before[0] == fresh_rows * layers * 2
    assert min(fresh_rows_seen) == 2  # steps where only one of three requests computed attention
    assert sum(fresh_rows_seen) < 2 * 3 * 9  # far fewer than the exact path


def test_cache_is_released_and_accounted(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    requests = batch(3, "attention", n=2, steps=6)
    predicted = sum(engine.request_cache_bytes(r, "attention") for r in requests)
    for r in requests:
        engine.add(r)
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.cache_bytes())
    assert peak == predicted
    assert engine.cache_bytes() == 0
    # the pools stay for the next requests of this size (their CUDA graphs hold them) ...
    assert engine.cache_allocated_bytes() == predicted
    assert engine.attention.allocated_bytes() == predicted  # the planned figure is the pools' real size
    engine.trim_cache()  # ... until trimmed (an out-of-memory step does this)
    assert engine.cache_allocated_bytes() == 0 and engine.attention.allocated_bytes() == 0


@pytest.mark.parametrize("policy", ["attention", "step"])
def test_cached_policies_stay_close_to_exact(tiny_model_dir, policy):
    exact = run_all(make_engine(tiny_model_dir), batch(1, steps=10))
    cached = run_all(make_engine(tiny_model_dir), batch(2, policy, steps=10))
    for a, b in zip(exact, cached):
        diff = np.abs(a - b)
        assert diff.mean() < 25  # close in pixels, but not identical: caching did something
    assert any(not np.array_equal(a, b) for a, b in zip(exact, cached))


@pytest.mark.parametrize("policy", ["attention", "step"])
def test_extrapolation_orders_and_clocks_change_cached_steps_only(tiny_model_dir, policy):
    """Each extrapolation (order 1 or 2, in steps or in sigma) gives its own images at K = 3, all
    close to exact: the orders and clocks really reach the cached quantity."""
    exact = run_all(make_engine(tiny_model_dir), batch(1, steps=10))
    images = {
        la: run_all(make_engine(tiny_model_dir, latent_aware=la), batch(3, policy, steps=10))
        for la in ("extrapolate", "extrapolate2", "extrapolate-sigma", "extrapolate2-sigma")
    }
    for la, cached in images.items():
        assert max(np.abs(a - b).mean() for a, b in zip(exact, cached)) < 25, la
    distinct = {tuple(np.concatenate([im.ravel() for im in cached])[:4096].tolist()) for cached in images.values()}
    assert len(distinct) == len(images)


def test_step_policy_skips_transformer_rows(tiny_model_dir, monkeypatch):
    """`step` policy: CACHED requests do not enter the transformer at all."""
    engine = make_engine(tiny_model_dir)
    rows_in_forward = []
    real_forward = engine.pipe.transformer.forward
    monkeypatch.setattr(
        engine.pipe.transformer,
        "forward",
        lambda *a, **kw: (rows_in_forward.append(kw["hidden_states"].shape[0]), real_forward(*a, **kw))[1],
    )
    for r in batch(4, "step", n=4, steps=9):
        engine.add(r)
    fresh_rows = []
    while engine.has_work():
        before = len(rows_in_forward)
        report = engine.step()
        fresh = round(report.fresh_ratio * report.batch_size)
        fresh_rows.append(2 * fresh)
        assert sum(rows_in_forward[before:]) == 2 * fresh
    assert min(fresh_rows) == 2  # one of four requests ran the transformer
    assert sum(rows_in_forward) < 2 * 4 * 9


@pytest.mark.parametrize(
    "floor, expected",
    [
        (1, [1.0] * 5),  # the seed rule: with N <= K exactly one request per step, so a lone one always
        (0, [1.0, 0.0, 0.0, 0.0, 1.0]),  # the default: its own interval, FRESH at the warm-up and the end
    ],
)
def test_a_lone_request_s_fresh_steps(tiny_model_dir, floor, expected):
    engine = make_engine(tiny_model_dir, min_fresh_per_step=floor)
    [req] = batch(4, "step", n=1, steps=5)
    engine.add(req)
    ratios = []
    while engine.has_work():
        ratios.append(engine.step().fresh_ratio)
    assert ratios == expected


def test_seed_rule_matches_hand_computed_values():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])  # (1, 1, 2, 2)
    # dx at (0,0) = 1 - 0 = 1; dy at (0,0) = 2 - 0 = 2; edge = sqrt(5)
    edge = math.sqrt(5.0)
    values = [0.0, 1.0, 2.0, 4.0]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)  # unbiased, as torch.std

    def sig(z):
        return 1 / (1 + math.exp(-z))

    adj = (std + 0.3 * edge) * (1 + 0.3 * sig(2 * edge))
    sigma = 0.8
    tilde = sigma * (0.7 + 0.3 * sig(adj))
    assert seed_edge(x).item() == pytest.approx(edge, rel=1e-6)
    assert seed_sigma_tilde(x, torch.tensor(sigma).view(1, 1, 1, 1)).item() == pytest.approx(tilde, rel=1e-6)

    v = torch.full_like(x, 0.5)
    sigma_next = 0.6
    out = SeedRule().update(x, v, torch.tensor(sigma).view(1, 1, 1, 1), torch.tensor(sigma_next).view(1, 1, 1, 1))
    x0 = x - tilde * v
    eps = (x - (1 - sigma) * x0) / sigma
    expected = (1 - sigma_next) * x0 + sigma_next * eps
    assert torch.allclose(out, expected, atol=1e-6)


def test_seed_rule_with_exact_sigma_is_euler():
    """The x0 form with sigma_tilde = sigma is exactly x + (sigma_next - sigma) v."""
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma, sigma_next = torch.tensor(0.7).view(1, 1, 1, 1), torch.tensor(0.5).view(1, 1, 1, 1)
    x0 = x - sigma * v
    eps = (x - (1 - sigma) * x0) / sigma
    assert torch.allclose((1 - sigma_next) * x0 + sigma_next * eps, x + (sigma_next - sigma) * v, atol=1e-5)
