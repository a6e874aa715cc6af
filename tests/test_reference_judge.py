"""The deterministic judge: validated on the generator's own images, and it must reject
mismatches (a judge that passes everything would make every quality number meaningless)."""

from __future__ import annotations

import numpy as np
import pytest

from models.reference import data, judge


@pytest.fixture(scope="module")
def samples():
    specs = data.sample_specs(200, seed=11, combos=data.all_combos())
    return specs, [data.render_numpy(s) for s in specs]


def test_judge_passes_at_least_98_percent_of_generator_images(samples):
    specs, images = samples
    assert judge.accuracy(images, [s.caption for s in specs]) >= 0.98


def test_judge_names_every_attribute_of_generator_images(samples):
    specs, images = samples
    for s, img in zip(specs[:60], images[:60]):
        v = judge.judge(img, s.caption)
        assert (v.shape, v.colour, v.background) == s.combo


def test_judge_rejects_a_wrong_shape_colour_or_background(samples):
    specs, images = samples
    for s, img in zip(specs[:40], images[:40]):
        other_shape = data.SHAPES[(data.SHAPES.index(s.shape) + 1) % len(data.SHAPES)]
        others = [c for c in data.COLOURS if c not in (s.colour, s.background)]
        assert not judge.judge(img, data.caption(other_shape, s.colour, s.background)).ok
        assert not judge.judge(img, data.caption(s.shape, others[0], s.background)).ok
        assert not judge.judge(img, data.caption(s.shape, s.colour, others[1])).ok
        swapped = judge.judge(img, data.caption(s.shape, s.background, s.colour))
        assert not swapped.ok and not swapped.colour_ok and not swapped.background_ok


def test_judge_tolerates_noise_and_blur(samples):
    specs, images = samples
    rng = np.random.default_rng(0)
    passed = 0
    for s, img in zip(specs[:50], images[:50]):
        x = img.astype(np.float64)
        x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 5
        x = np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8)
        passed += judge.judge(x, s.caption).ok
    assert passed >= 49


def test_a_plain_image_has_no_shape():
    plain = np.zeros((128, 128, 3), np.uint8) + np.array(data.COLOURS["green"], np.uint8)
    v = judge.judge(plain, "a red circle on a green background")
    assert v.shape is None and v.background_ok and not v.ok


def test_a_blob_is_not_a_square_or_a_cross():
    rng = np.random.default_rng(1)
    spec = data.Spec("circle", "red", "blue", 64, 64, 30)
    img = data.render_numpy(spec).astype(np.float64)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    assert judge.judge(img, "a red circle on a blue background").ok
    assert not judge.judge(img, "a red square on a blue background").ok
    assert not judge.judge(img, "a red cross on a blue background").ok


def test_judge_accepts_pil_images_and_rejects_bad_input():
    from PIL import Image

    s = data.Spec("triangle", "yellow", "purple", 60, 70, 35)
    assert judge.judge(Image.fromarray(data.render_numpy(s)), s.caption).ok
    with pytest.raises(ValueError):
        judge.judge(np.zeros((8, 8)), s.caption)
    with pytest.raises(ValueError):
        judge.judge(data.render_numpy(s), "a yellow triangle")
    with pytest.raises(ValueError):
        judge.accuracy([], [])
