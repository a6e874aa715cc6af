"""The shipped reference model (models/sd3-shapes): its folder, its loading, and a CPU quality
regression check: images generated through diffusers' own pipeline at the model's serving
defaults must match their prompts according to the judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.reference import data, judge

MODEL = Path(__file__).resolve().parent.parent / "models" / "sd3-shapes"
# Ten held-out prompts with fixed seeds, two per shape, all eight colours (every 29th of the
# 280-prompt held-out set).
REGRESSION_PROMPTS = data.held_out_prompts()[::29][:10]
# Measured with the shipped model at its defaults on CPU (models/README.md): 10 of these 10 pass
# (the model scores 93.9 % on all 280). One image of slack for float differences between
# machines. Re-measure (never just lower) when the model is retrained.
MIN_PASSING = 9


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    p = StableDiffusion3Pipeline.from_pretrained(MODEL)  # no extra arguments needed
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def serve() -> dict:
    return json.loads((MODEL / "sd3serve.json").read_text())


@pytest.fixture(scope="module")
def images(pipe, serve):
    gens = [torch.Generator("cpu").manual_seed(p.seed) for p in REGRESSION_PROMPTS]
    with torch.inference_mode():
        out = pipe(
            [p.prompt for p in REGRESSION_PROMPTS],
            num_inference_steps=serve["steps"],
            guidance_scale=serve["guidance_scale"],
            height=serve["height"],
            width=serve["width"],
            max_sequence_length=serve["max_sequence_length"],
            generator=gens,
        )
    return out.images


def test_folder_is_small_and_declares_serving_defaults(serve):
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 60 * 1024 * 1024
    assert set(serve) == {"width", "height", "steps", "guidance_scale", "max_sequence_length"}
    assert (serve["width"], serve["height"]) == (128, 128)
    assert 1 <= serve["steps"] <= 28 and serve["guidance_scale"] > 1.0
    assert serve["max_sequence_length"] <= 16


def test_loads_as_a_float32_sd3_pipeline(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor not in (None, 1.0) and pipe.vae.config.shift_factor is not None
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float32}, name


def test_generated_images_match_their_prompts(images):
    verdicts = [judge.judge(img, p.prompt) for img, p in zip(images, REGRESSION_PROMPTS)]
    assert {p.prompt.split()[2] for p in REGRESSION_PROMPTS} == set(data.SHAPES)
    assert all(v.background_ok for v in verdicts), [(p.prompt, v) for p, v in zip(REGRESSION_PROMPTS, verdicts)]
    assert sum(v.ok for v in verdicts) >= MIN_PASSING, [(p.prompt, v) for p, v in zip(REGRESSION_PROMPTS, verdicts)]


def test_the_same_images_fail_mismatched_prompts(images):
    """The check above can fail: judged against a caption with the colours swapped, or another
    shape, the same images do not pass."""
    for img, p in zip(images, REGRESSION_PROMPTS):
        shape, colour, background = data.parse_caption(p.prompt)
        assert not judge.judge(img, data.caption(shape, background, colour)).ok
