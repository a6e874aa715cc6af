"""Loading a diffusers SD3 pipeline and its serving defaults (prompt embeddings: engine/prompt_encoder.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from engine.config import EngineConfig, random_model_name

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(config: EngineConfig) -> StableDiffusion3Pipeline:
    """Load any SD3-family pipeline from a local folder or a hub id; T5 is optional."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    random_name = random_model_name(config.model)
    if random_name is not None:
        from engine.random_model import build_pipeline

        log.warning("model %s: RANDOM weights at the real shapes (benchmarks only; images are noise)", config.model)
        return _ready(build_pipeline(random_name, device, dtype))
    path = Path(config.model)
    kwargs: dict = {}
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        if not (path / "text_encoder_3").exists():
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
    elif path.is_absolute() or config.model.startswith("."):
        raise FileNotFoundError(f"model folder {path} does not exist")
    pipe = StableDiffusion3Pipeline.from_pretrained(config.model, dtype=dtype, **kwargs)
    pipe.to(device)
    return _ready(pipe)


def _ready(pipe: StableDiffusion3Pipeline) -> StableDiffusion3Pipeline:
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe
