"""Loading a diffusers SD3 pipeline, its serving defaults, and the prompt-embedding LRU cache."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from engine.config import EngineConfig

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
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


@dataclass(frozen=True)
class PromptEmbeddings:
    """Embeddings of one (prompt, negative prompt) pair; each tensor has a batch dim of 1."""

    prompt: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor
    negative_pooled: torch.Tensor


class PromptEncoder:
    """The pipeline's own `encode_prompt`, batched over misses, behind an LRU cache."""

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int, capacity: int = 256) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], PromptEmbeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @torch.inference_mode()
    def encode(self, pairs: list[tuple[str, str]]) -> list[PromptEmbeddings]:
        missing = list(dict.fromkeys(p for p in pairs if p not in self._cache))
        self.hits += len(pairs) - len(missing)
        self.misses += len(missing)
        if missing:
            pe, npe, pooled, npooled = self.pipe.encode_prompt(
                prompt=[p for p, _ in missing],
                prompt_2=None,
                prompt_3=None,
                negative_prompt=[n for _, n in missing],
                do_classifier_free_guidance=True,
                device=self.pipe._execution_device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            for i, pair in enumerate(missing):
                self._cache[pair] = PromptEmbeddings(pe[i : i + 1], pooled[i : i + 1], npe[i : i + 1], npooled[i : i + 1])
        out = []
        for pair in pairs:
            self._cache.move_to_end(pair)
            out.append(self._cache[pair])
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out
