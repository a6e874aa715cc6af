"""Random-weight SD3 pipelines at the real shapes, built straight on the device (no hub, no files).

Timing does not depend on weight values, so benchmarks (and a worker started with
`--model random:sd3-medium`, for load tests on machines without the real weights) build
SD3-medium and SD3.5-large transformers, full-size CLIP-L, CLIP-G and T5-XXL text encoders and
SD3's VAE with random weights, initialised on the device in the target dtype (a CPU init of a
4.7B T5 takes minutes). Tokenizers are the offline byte-level ones of engine/tiny.py; the
embedding tables have the real vocabulary sizes (49408 CLIP, 32128 T5). `tiny` gives the tiny
test pipeline (CPU smoke runs). Images from random weights are noise: benchmark use only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from engine.tiny import build_tiny_components, byte_level_clip_tokenizer, byte_level_t5_tokenizer, sd3_vae

COMMON = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
TRANSFORMERS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536),
    "sd3.5-large": dict(COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"),
}
CLIP_VOCAB = 49408
T5_VOCAB = 32128


@contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """New parameters land on `device` in `dtype` as they are created."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _ready(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_transformer(name: str, device, dtype) -> SD3Transformer2DModel:
    with building(device, dtype):
        model = SD3Transformer2DModel(**TRANSFORMERS[name])
    return _ready(model, device, dtype)


def _clip(tokenizer, hidden: int, layers: int, heads: int, act: str) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_text_encoders(device, dtype) -> dict:
    clip_tokenizer, clip_tokenizer_2, t5_tokenizer = (
        byte_level_clip_tokenizer(),
        byte_level_clip_tokenizer(),
        byte_level_t5_tokenizer(),
    )
    with building(device, dtype):
        clip_l = _clip(clip_tokenizer, 768, 12, 12, "quick_gelu")
        clip_g = _clip(clip_tokenizer_2, 1280, 32, 20, "gelu")
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=T5_VOCAB,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
                tie_word_embeddings=False,
            )
        )
    return dict(
        text_encoder=_ready(clip_l, device, dtype),
        tokenizer=clip_tokenizer,
        text_encoder_2=_ready(clip_g, device, dtype),
        tokenizer_2=clip_tokenizer_2,
        text_encoder_3=_ready(t5, device, dtype),
        tokenizer_3=t5_tokenizer,
    )


def build_vae(device, dtype) -> AutoencoderKL:
    with building(device, dtype):
        vae = sd3_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024)
    return _ready(vae, device, dtype)


def build_pipeline(name: str, device, dtype, shared: dict | None = None) -> StableDiffusion3Pipeline:
    """A real-shaped random pipeline; `shared` reuses another pipeline's text encoders and VAE
    (SD3-medium and SD3.5-large have the same ones)."""
    if name == "tiny":
        pipe = StableDiffusion3Pipeline(**build_tiny_components(with_t5=True))
        pipe.to(device=device, dtype=dtype)
    else:
        parts = dict(shared) if shared else dict(build_text_encoders(device, dtype), vae=build_vae(device, dtype))
        pipe = StableDiffusion3Pipeline(
            transformer=build_transformer(name, device, dtype),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            **parts,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shared_parts(pipe: StableDiffusion3Pipeline) -> dict:
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "vae")
    return {name: getattr(pipe, name) for name in names}
