"""Benchmark shapes: the random-weight pipelines live in engine/random_model.py (a worker can serve
one with `--model random:sd3-medium`); this module adds the fixed inputs of one forward."""

from __future__ import annotations

import torch

from engine.engine import DEFAULT_MAX_SEQUENCE_LENGTH
from engine.random_model import (  # noqa: F401  (re-exported for the bench)
    TRANSFORMERS,
    build_pipeline,
    build_text_encoders,
    build_transformer,
    build_vae,
    building,
    shared_parts,
)
from engine.tiny import CLIP_MAX_LENGTH

# CLIP's 77 tokens + T5's at the engine's default max_sequence_length (256): SD3's joint text length
TEXT_TOKENS = CLIP_MAX_LENGTH + DEFAULT_MAX_SEQUENCE_LENGTH


def forward_inputs(transformer, size: int, device, dtype, rows: int = 2) -> dict:
    """Fixed random inputs of one transformer forward at `size`² with `rows` rows."""
    g = torch.Generator("cpu").manual_seed(size)
    cfg = transformer.config
    text = TEXT_TOKENS
    return dict(
        hidden_states=torch.randn(rows, cfg.in_channels, size // 8, size // 8, generator=g).to(device, dtype),
        timestep=torch.linspace(950.0, 50.0, rows, device=device),
        encoder_hidden_states=torch.randn(rows, text, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(rows, cfg.pooled_projection_dim, generator=g).to(device, dtype),
    )
