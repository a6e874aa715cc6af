"""The reference model's parts build offline, save in diffusers format, load with a bare
`StableDiffusion3Pipeline.from_pretrained(path)`, and training encodes prompts exactly as the
pipeline does."""

from __future__ import annotations

import json

import pytest
import torch

from models.reference import data
from models.reference.build import SERVE_FILE, ModelSpec, ServeDefaults, build_pipeline, save_pipeline
from models.reference.text import TextBatcher, encode_tokens
from models.reference.tokenizer import learn_merges

TINY = ModelSpec(
    layers=1,
    width=64,
    clip_widths=(32, 32),
    clip_layers=1,
    t5_layers=1,
    vae_channels=(8, 16, 16, 16),
    vae_groups=4,
    pos_embed_max_size=16,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    work = tmp_path_factory.mktemp("ref-build")
    pipe = build_pipeline(TINY, work / "tok", seed=0)
    save_pipeline(pipe, work / "pipe", ServeDefaults(steps=3, guidance_scale=4.0))
    return pipe, work / "pipe"


def test_bpe_merges_make_each_word_one_token():
    merges = learn_merges(["red", "green", "background"])
    assert merges and all(len(m) == 2 for m in merges)


def test_caption_words_are_single_tokens_and_other_text_still_tokenizes(saved):
    pipe, _ = saved
    for tok in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        for word in data.CAPTION_WORDS:
            assert len(tok(word, add_special_tokens=False).input_ids) == 1, (tok, word)
        assert len(tok("a teal hexagon, please!", add_special_tokens=False).input_ids) > 3
    assert pipe.tokenizer.model_max_length == TINY.clip_max_length
    t5_ids = pipe.tokenizer_3(data.caption("circle", "red", "blue")).input_ids
    assert len(t5_ids) == ServeDefaults().max_sequence_length  # 7 words + </s>


def test_saved_folder_loads_without_extra_arguments(saved):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    _, path = saved
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert pipe.transformer.dtype == torch.float32  # stored fp16, loaded as float32
    assert json.loads((path / SERVE_FILE).read_text()) == {
        "width": 128,
        "height": 128,
        "steps": 3,
        "guidance_scale": 4.0,
        "max_sequence_length": 8,
    }
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=128,
        width=128,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert img.size == (128, 128)


def test_training_prompt_encoding_equals_the_pipelines(saved):
    pipe, _ = saved
    captions = [data.caption("cross", "white", "black"), data.caption("diamond", "orange", "green")]
    text = TextBatcher([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], captions, 8, "cpu")
    rows = torch.tensor([0, 1, text.empty_index])
    with torch.no_grad():
        ours, ours_pooled = encode_tokens(
            (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3),
            text.ids(rows),
            pipe.transformer.config.joint_attention_dim,
        )
        prompts = captions + [""]
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=8
        )
    assert ours.shape == theirs.shape == (3, TINY.clip_max_length + 8, TINY.joint_dim)
    assert torch.equal(ours, theirs) and torch.equal(ours_pooled, theirs_pooled)
