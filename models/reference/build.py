"""The reference model's architecture: configs for every SD3 pipeline part, built offline.

Real SD3 parts (SD3Transformer2DModel, AutoencoderKL with 16 latent channels, two
CLIPTextModelWithProjection + CLIPTokenizer, a T5EncoderModel + T5 tokenizer,
FlowMatchEulerDiscreteScheduler), sized for 128x128 shapes and CPU serving. The T5 is tiny and
trained with the rest, so `StableDiffusion3Pipeline.from_pretrained(path)` needs no extra
arguments; its `max_sequence_length` (sd3serve.json) is 8, one token per caption word plus </s>,
which keeps the joint attention short. CLIP prompts are 16 tokens (tokenizer model_max_length).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from engine.config import MODEL_DEFAULTS_FILE
from engine.tiny import sd3_vae
from models.reference.data import CAPTION_WORDS, IMAGE_SIZE
from models.reference.tokenizer import write_t5_tokenizer, write_tokenizer

SERVE_FILE = MODEL_DEFAULTS_FILE  # the file the engine reads serving defaults from


@dataclass(frozen=True)
class ModelSpec:
    layers: int = 6
    width: int = 256  # transformer inner dim = heads * 64
    clip_widths: tuple[int, int] = (64, 96)  # CLIP-L-like and CLIP-G-like, each projected to its width
    clip_layers: int = 2
    clip_max_length: int = 16  # tokenizer model_max_length: the pipeline pads CLIP prompts to this
    t5_layers: int = 2  # T5 width is the joint attention width, sum(clip_widths)
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)  # 3 downsamples: 128 px -> 16x16 latents
    vae_groups: int = 4  # 8+ channels per GroupNorm group keeps absolute colour
    pos_embed_max_size: int = 64  # patches per side: images up to 1024 px
    scheduler_shift: float = 3.0

    @property
    def joint_dim(self) -> int:
        return sum(self.clip_widths)


@dataclass(frozen=True)
class ServeDefaults:
    """Written to sd3serve.json; the engine reads it as the model's serving defaults."""

    width: int = IMAGE_SIZE
    height: int = IMAGE_SIZE
    steps: int = 20
    guidance_scale: float = 5.0
    max_sequence_length: int = 8


def transformer(spec: ModelSpec) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=spec.layers,
        attention_head_dim=64,
        num_attention_heads=spec.width // 64,
        joint_attention_dim=spec.joint_dim,
        caption_projection_dim=spec.width,
        pooled_projection_dim=spec.joint_dim,
        pos_embed_max_size=spec.pos_embed_max_size,
    )


def vae(spec: ModelSpec, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> AutoencoderKL:
    return sd3_vae(
        spec.vae_channels,
        layers_per_block=1,
        norm_num_groups=spec.vae_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        sample_size=IMAGE_SIZE,
    )


def text_encoder(spec: ModelSpec, width: int, vocab_size: int, bos: int, eos: int) -> CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=spec.clip_layers,
        num_attention_heads=max(1, width // 32),
        max_position_embeddings=spec.clip_max_length,
        hidden_act="gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModelWithProjection(cfg)


def t5_encoder(spec: ModelSpec, vocab_size: int) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=spec.joint_dim,
        d_kv=32,
        d_ff=2 * spec.joint_dim,
        num_layers=spec.t5_layers,
        num_heads=spec.joint_dim // 32,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(cfg)


def scheduler(spec: ModelSpec) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.scheduler_shift)


def build_pipeline(spec: ModelSpec, work_dir: str | Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised pipeline; `work_dir` receives the tokenizer files."""
    torch.manual_seed(seed)
    work_dir = Path(work_dir)
    toks = [write_tokenizer(work_dir / name, list(CAPTION_WORDS), spec.clip_max_length) for name in ("tokenizer", "tokenizer_2")]
    encoders = [text_encoder(spec, w, len(t), t.bos_token_id, t.eos_token_id) for w, t in zip(spec.clip_widths, toks)]
    t5_tok = write_t5_tokenizer(work_dir / "tokenizer_3", list(CAPTION_WORDS))
    return StableDiffusion3Pipeline(
        transformer=transformer(spec),
        scheduler=scheduler(spec),
        vae=vae(spec),
        text_encoder=encoders[0],
        tokenizer=toks[0],
        text_encoder_2=encoders[1],
        tokenizer_2=toks[1],
        text_encoder_3=t5_encoder(spec, len(t5_tok)),
        tokenizer_3=t5_tok,
    )


def save_pipeline(pipe: StableDiffusion3Pipeline, folder: str | Path, serve: ServeDefaults) -> None:
    """Transformer and VAE as fp16 safetensors (diffusers upcasts them to float32 unless told
    otherwise); the small text encoders stay float32, because transformers loads a checkpoint in
    its stored dtype and a bare from_pretrained(path) must give a consistent float32 pipeline."""
    folder = Path(folder)
    big = (pipe.transformer, pipe.vae)
    for m in big:
        m.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    for m in big:
        m.to(torch.float32)
    (folder / SERVE_FILE).write_text(json.dumps(asdict(serve), indent=2) + "\n")


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
