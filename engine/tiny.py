"""Tiny random SD3 pipelines for tests and benchmarks, built offline (no model hub).

`build_tiny_pipeline(path)` saves a complete `StableDiffusion3Pipeline` (two CLIP text encoders
with projection, optional T5, a 16-channel VAE and an `SD3Transformer2DModel`) in diffusers
format, with tokenizers made from byte-level vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MAX_LENGTH = 77


def sd3_vae(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    scaling_factor: float = 1.5305,
    shift_factor: float = 0.0609,
    **extra,
) -> AutoencoderKL:
    """SD3's VAE architecture (16 latent channels; SD3's latent scaling and shift unless given)
    at the given widths."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        **extra,
    )


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single byte-level characters (no merges)."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def byte_level_t5_tokenizer() -> T5TokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(32, 127)] + [("\u2581", -1.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_encoder(vocab_size: int, hidden: int, projection: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_components(with_t5: bool = True, seed: int = 0) -> dict:
    """The pieces of a tiny SD3 pipeline, with deterministic random weights."""
    clip_tok = byte_level_clip_tokenizer()
    vocab_size = len(clip_tok)
    # CLIP-L + CLIP-G hidden sizes must add up to the transformer's caption projection input
    # (joint_attention_dim); pooled sizes add up to pooled_projection_dim.
    text_encoder = _clip_encoder(vocab_size, hidden=16, projection=16, seed=seed)
    text_encoder_2 = _clip_encoder(vocab_size, hidden=16, projection=16, seed=seed + 1)
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=32,
    ).eval()
    torch.manual_seed(seed + 3)
    vae = sd3_vae(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4).eval()
    components = dict(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if with_t5:
        torch.manual_seed(seed + 4)
        t5_tok = byte_level_t5_tokenizer()
        t5_config = T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        components["text_encoder_3"] = T5EncoderModel(t5_config).eval()
        components["tokenizer_3"] = t5_tok
    return components


def build_tiny_pipeline(path: str | Path, with_t5: bool = True, seed: int = 0) -> Path:
    """Save a tiny random SD3 pipeline at `path` in diffusers format and return the path."""
    path = Path(path)
    pipe = StableDiffusion3Pipeline(**build_tiny_components(with_t5=with_t5, seed=seed))
    pipe.save_pretrained(path)
    return path
