"""Regional compile of SD3's text encoders (CLIP-L, CLIP-G, T5-XXL): each encoder layer with
dynamic shapes, as the transformer's blocks are. Prompt encoding of new requests is on the
critical path of their first step; eagerly it is launch-bound at small batches."""

from __future__ import annotations

from typing import Any

import torch


def encoder_layers(encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The repeated layers of a transformers text encoder: CLIP's `text_model.encoder.layers`,
    T5's `encoder.block`; None for anything else."""
    for path in ("text_model.encoder.layers", "encoder.block"):
        module: Any = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    return None


def compile_text_encoders(pipe, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every layer of the pipeline's text encoders in place; returns the layers compiled."""
    compiled = 0
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)):
        layers = None if encoder is None else encoder_layers(encoder)
        for layer in layers or ():
            layer.compile(backend=backend, mode=mode, dynamic=True)
            compiled += 1
    return compiled
