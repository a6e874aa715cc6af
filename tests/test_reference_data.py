"""The procedural data set: captions, combos, held-out split, rendering."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.reference import data


def test_vocabulary_is_at_least_four_shapes_and_six_colours():
    assert len(data.SHAPES) >= 4 and len(data.COLOURS) >= 6


def test_caption_round_trips():
    assert data.caption("circle", "red", "blue") == "a red circle on a blue background"
    assert data.parse_caption("a red circle on a blue background") == ("circle", "red", "blue")
    for bad in ("a red circle", "a red blob on a blue background", "a red circle on a teal background"):
        with pytest.raises(ValueError):
            data.parse_caption(bad)


def test_held_out_combos_are_unseen_but_their_parts_are_seen():
    combos, train = data.all_combos(), set(data.training_combos())
    held = [c for c in combos if c not in train]
    assert len(combos) == len(data.SHAPES) * len(data.COLOURS) * (len(data.COLOURS) - 1)
    assert 0.05 < len(held) / len(combos) < 0.12
    for shape, colour, background in held:
        assert any(s == shape and c == colour for s, c, _ in train)
        assert any(c == colour and b == background for _, c, b in train)
        assert any(s == shape and b == background for s, _, b in train)
    assert all(c in train for c in (x.combo for x in data.sample_specs(500, seed=1)))


def test_held_out_prompts_are_fixed_distinct_and_numerous():
    a, b = data.held_out_prompts(), data.held_out_prompts()
    assert a == b and len(a) >= 200
    assert len({p.prompt for p in a}) == len(a)
    assert sum(p.held_out_combo for p in a) == sum(data.is_held_out_combo(c) for c in data.all_combos())


def test_specs_are_reproducible_and_keep_the_shape_inside_the_image():
    assert data.sample_specs(50, seed=3) == data.sample_specs(50, seed=3)
    assert data.sample_specs(50, seed=3) != data.sample_specs(50, seed=4)
    for s in data.sample_specs(300, seed=5):
        assert s.colour != s.background
        assert data.MARGIN <= s.cx - s.radius and s.cx + s.radius <= data.IMAGE_SIZE - data.MARGIN
        assert data.MARGIN <= s.cy - s.radius and s.cy + s.radius <= data.IMAGE_SIZE - data.MARGIN


def test_torch_and_numpy_renderers_agree():
    specs = data.sample_specs(6, seed=9, combos=data.all_combos())
    batch = data.render_torch(specs)
    assert tuple(batch.shape) == (6, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0
    as_uint8 = ((batch + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    reference = np.stack([data.render_numpy(s) for s in specs]).astype(np.float64)
    assert np.abs(as_uint8 - reference).max() <= 1.0


def test_rendered_image_has_the_right_colours_where_expected():
    spec = data.Spec("square", "red", "blue", cx=64, cy=64, radius=30)
    img = data.render_numpy(spec)
    assert tuple(img[64, 64]) == data.COLOURS["red"]
    assert tuple(img[2, 2]) == data.COLOURS["blue"]
    assert tuple(img[64, 64 + 28]) == data.COLOURS["blue"]  # square half-side is 0.85 r


def test_each_shape_has_a_distinct_mask():
    g = (np.arange(200) + 0.5) / 100 - 1.0
    u, v = np.meshgrid(g, g)
    masks = {s: data.shape_mask(s, u, v) for s in data.SHAPES}
    for a in data.SHAPES:
        for b in data.SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)
    with pytest.raises(ValueError):
        data.shape_mask("hexagon", u, v)


def test_training_stream_is_reproducible():
    a, b = data.batches(4, seed=1), data.batches(4, seed=1)
    assert next(a) == next(b) and next(a) == next(b)
    assert random.Random(0).random() == random.Random(0).random()
