"""The engine's exact path equals diffusers' StableDiffusion3Pipeline, alone and mid-batch.

Tolerance: both sides produce uint8 PNG pixels from float32 CPU math. The engine runs the same
ops per row, but batched matmuls may round differently in the last float32 bit, which can flip
a pixel's rounding to uint8: we allow at most 1/255 (one level) per channel, and in practice
the float images agree to ~1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import validate_request
from tests.conftest import TINY_MAX_SEQUENCE_LENGTH

ONE_LEVEL = 1


def reference_image(model_dir, request, with_t5: bool) -> np.ndarray:
    kwargs = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=request.width,
        height=request.height,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def make_engine(model_dir) -> Engine:
    return Engine.from_config(EngineConfig(model=str(model_dir), device="cpu", dtype="float32"))


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
def test_engine_equals_diffusers_pipeline(request, with_t5):
    model_dir = request.getfixturevalue("tiny_model_dir" if with_t5 else "tiny_model_dir_no_t5")
    engine = make_engine(model_dir)
    cases = [
        dict(prompt="a red circle on a blue background", seed=11, steps=5, guidance_scale=4.5, width=64, height=64),
        dict(prompt="a square", negative_prompt="blurry", seed=12, steps=3, guidance_scale=1.0, width=80, height=64),
    ]
    for case in cases:
        req = validate_request(case)
        image = engine.generate([req])[req.request_id]
        assert image.size == (req.width, req.height)
        ref = reference_image(model_dir, req, with_t5)
        assert max_diff(image, ref) <= ONE_LEVEL, case


def test_batch_independence(tiny_model_dir):
    """A request joining mid-flight a batch of 3 others (other steps, step counts, guidance,
    seeds) gives the same image as when it runs alone."""
    target = dict(prompt="a green triangle", seed=7, steps=6, guidance_scale=5.0, width=64, height=64)
    alone_engine = make_engine(tiny_model_dir)
    alone_req = validate_request(target)
    alone = alone_engine.generate([alone_req])[alone_req.request_id]

    engine = make_engine(tiny_model_dir)
    others = [
        validate_request(dict(prompt="one", seed=1, steps=8, guidance_scale=3.0, width=64, height=64)),
        validate_request(dict(prompt="two", seed=2, steps=5, guidance_scale=1.0, width=64, height=64)),
        validate_request(dict(prompt="three", seed=3, steps=9, guidance_scale=7.5, width=64, height=64)),
    ]
    for other in others:
        engine.add(other)
    for _ in range(2):  # the others are two steps in when the target arrives
        engine.step()
    progress = [engine.progress(o.request_id) for o in others]
    assert all(p is not None and p[0] == 2 for p in progress)
    joined = validate_request(target)
    engine.add(joined)
    images = {}
    batch_sizes = []
    while engine.has_work():
        report = engine.step()
        batch_sizes.append(report.batch_size)
        images.update({f.request.request_id: f.image for f in report.finished})
    assert max(batch_sizes) == 4, batch_sizes
    assert max_diff(images[joined.request_id], alone) <= ONE_LEVEL
    assert set(images) == {joined.request_id} | {o.request_id for o in others}


def test_different_sizes_run_in_separate_sub_batches(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    a = validate_request(dict(prompt="a", seed=1, steps=3, width=64, height=64))
    b = validate_request(dict(prompt="b", seed=2, steps=3, width=96, height=64))
    engine.add(a)
    engine.add(b)
    sizes = []
    while engine.has_work():
        report = engine.step()
        sizes.append(report.batch_size)
    assert sizes == [1] * 6  # alternating one forward per sub-batch
