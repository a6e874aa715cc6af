"""Quality regression on the reference model (CPU): the exact path draws what the prompt says,
and the caching a user gets by asking (`cache_interval` 3, the ~2x preset, and 2, the ~1.6x one;
engine/cache_presets.py) keeps the exact path's judge accuracy (one image at most) at >= 30 dB
and SSIM >= 0.95 (3) and >= 35 dB (2) against the exact images.

Thresholds come from measurement (issue 16). On all 280 held-out prompts (CPU, float32,
bench/results/caching_cpu_280.json) exact passed 93.9 %, preset 3 93.6 % at 34.0 dB / SSIM 0.980,
preset 2 93.6 % at 39.6 dB / 0.992. This set is every fifth held-out prompt (56, to keep CI
under 20 minutes; bench.quality runs all 280): one image is 1.8 points of accuracy, so "within
one point" is tested as "at most one image fewer"."""

from __future__ import annotations

import numpy as np
import pytest

from bench.image_metrics import psnr, ssim
from engine.config import REFERENCE_MODEL_DIR, EngineConfig
from engine.engine import Engine
from engine.loader import load_pipeline
from engine.request import validate_request
from models.reference.data import held_out_prompts
from models.reference.judge import accuracy as judge_accuracy

DEFAULT_CACHE_INTERVAL = 3  # the ~2x preset (engine/cache_presets.py)
FAITHFUL_CACHE_INTERVAL = 2  # the ~1.6x preset
EXACT_ACCURACY_TARGET = 0.90  # issue 5: exact-path judge accuracy >= 90 %


@pytest.fixture(scope="module")
def prompts():
    # every fifth held-out prompt: all shapes and colours, some never-trained combinations
    return held_out_prompts()[1::5]


@pytest.fixture(scope="module")
def pipe():
    if not (REFERENCE_MODEL_DIR / "model_index.json").exists():
        pytest.fail(f"the reference model is missing at {REFERENCE_MODEL_DIR}")
    return load_pipeline(EngineConfig(device="cpu", dtype="float32"))


def generate(pipe, prompts, cache_interval: int) -> list[np.ndarray]:
    engine = Engine(EngineConfig(device="cpu", dtype="float32", max_batch=8), pipe)
    requests = [
        validate_request(dict(prompt=p.prompt, seed=p.seed, cache_interval=cache_interval), engine.limits) for p in prompts
    ]
    images = engine.generate(requests)
    return [np.asarray(images[r.request_id].convert("RGB")) for r in requests]


@pytest.fixture(scope="module")
def exact_images(pipe, prompts):
    return generate(pipe, prompts, 1)


def test_exact_path_draws_the_prompt(exact_images, prompts):
    accuracy = judge_accuracy(exact_images, [p.prompt for p in prompts])
    assert accuracy >= EXACT_ACCURACY_TARGET, f"judge accuracy {accuracy:.1%} on the exact path"


@pytest.mark.slow
def test_default_caching_keeps_exact_accuracy_and_30_db(pipe, exact_images, prompts):
    captions = [p.prompt for p in prompts]
    cached = generate(pipe, prompts, DEFAULT_CACHE_INTERVAL)
    exact_accuracy = judge_accuracy(exact_images, captions)
    cached_accuracy = judge_accuracy(cached, captions)
    assert cached_accuracy >= exact_accuracy - 1 / len(prompts) - 1e-9  # one image at most
    fidelity = np.mean([psnr(a, b) for a, b in zip(cached, exact_images)])
    assert 30.0 <= fidelity < 60.0  # close to exact, and caching really changed the images
    assert np.mean([ssim(a, b) for a, b in zip(cached, exact_images)]) >= 0.95


@pytest.mark.slow
def test_faithful_caching_keeps_35_db(pipe, exact_images, prompts):
    captions = [p.prompt for p in prompts]
    cached = generate(pipe, prompts, FAITHFUL_CACHE_INTERVAL)
    assert judge_accuracy(cached, captions) >= judge_accuracy(exact_images, captions) - 1 / len(prompts) - 1e-9
    assert 35.0 <= np.mean([psnr(a, b) for a, b in zip(cached, exact_images)]) < 60.0


def test_image_metrics_behave():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(a.astype(int) + rng.integers(-90, 91, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisier) < ssim(a, noisy) < 1
    mse = np.mean((a.astype(float) - noisy) ** 2)
    assert psnr(a, noisy) == pytest.approx(10 * np.log10(255**2 / mse))
