"""Loading a diffusers SD3 pipeline, its serving defaults, and the prompt-embedding LRU cache."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PromptEmbeddings:
    """Embeddings of one (prompt, negative prompt) pair; each tensor has a batch dim of 1."""

    prompt: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor
    negative_pooled: torch.Tensor


class PromptEncoder:
    """The pipeline's own `encode_prompt`, batched over misses, behind an LRU cache of texts.

    Prompts and negative prompts go through the same text encoders (`encode_prompt` encodes the
    negative exactly as a prompt), so the cache is keyed by text: a batch of requests with the
    usual empty negative prompt encodes "" once, not once per request as the pipeline does.
    """

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int, capacity: int = 256) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.capacity = capacity
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @torch.inference_mode()
    def encode(self, pairs: list[tuple[str, str]]) -> list[PromptEmbeddings]:
        texts = [text for pair in pairs for text in pair]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=missing,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                device=self.pipe._execution_device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            for i, text in enumerate(missing):
                self._cache[text] = (embeds[i : i + 1], pooled[i : i + 1])
        out = []
        for prompt, negative in pairs:
            (pe, pp), (ne, npooled) = self._cache[prompt], self._cache[negative]
            out.append(PromptEmbeddings(pe, pp, ne, npooled))
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out
