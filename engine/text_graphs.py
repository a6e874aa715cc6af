"""CUDA graphs of the text encoders' forwards (CLIP-L, CLIP-G, T5-XXL) for a few texts at a time.

A new job's prompt is encoded on the critical path of its first step, and at one or two texts
the encoders are launch-bound: ~90 ms for one prompt on an H100 with their layers compiled, of
which the GPU needs a few (call k's profile, bench/README.md). On the H200 (call h6) each job's
encoding held its size's sub-batch ~80 ms, a 512² job's whole denoising being ~0.3 s. Replaying
a captured graph launches an encoder's forward at once.

Each encoder's `forward` is wrapped on the instance (diffusers' `encode_prompt` calls the modules
as usual): a call with token ids of a shape seen before, on CUDA, copies the ids into the graph's
input buffer, replays, and returns clones of its outputs in the encoder's own output type; a new
shape of at most `max_texts` texts is captured on first use after a warm-up run of the same
forward (outside the capture: compiled layers compile there, not inside it). Anything else (more
texts, extra arguments, a failed capture) runs the encoder as before. All the encoders' graphs
share one memory pool: they replay one at a time on one stream and every output is copied out
before the next replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class CapturedEncoder:
    graph: "torch.cuda.CUDAGraph"
    input_ids: torch.Tensor  # the static input the graph reads
    output: Any  # the static outputs it writes (the encoder's output type)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def _clone_output(output: Any) -> Any:
    """A copy of an encoder's output (a transformers `ModelOutput`, or a tuple) with fresh tensors."""
    if isinstance(output, tuple):
        return _clone(output)
    return type(output)(**{name: _clone(value) for name, value in output.items()})


class TextEncoderGraphs:
    """Graphed forwards of the pipeline's text encoders; `install` wraps them in place."""

    def __init__(self, max_texts: int = 4) -> None:
        if max_texts < 1:
            raise ValueError("max_texts must be >= 1")
        self.max_texts = max_texts
        self.captured: dict[tuple, CapturedEncoder] = {}
        self.failed = False  # a capture failed once: every encoder runs as before
        self._pool: Any = None

    def install(self, pipe) -> int:
        """Wrap every text encoder of `pipe` that is on a CUDA device; returns how many."""
        wrapped = 0
        for encoder in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)):
            if encoder is None or getattr(encoder, "_sd3serve_text_graphs", None) is not None:
                continue  # wrapped already (engines of one process may share their encoders)
            if next(encoder.parameters()).device.type != "cuda":
                continue
            encoder.forward = self._graphed(id(encoder), encoder.forward)
            encoder._sd3serve_text_graphs = self
            wrapped += 1
        return wrapped

    def _graphed(self, owner: int, eager: Callable[..., Any]) -> Callable[..., Any]:
        def forward(input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
            hidden = kwargs.pop("output_hidden_states", None)
            plain = (
                not args
                and not kwargs
                and isinstance(input_ids, torch.Tensor)
                and input_ids.is_cuda
                and input_ids.shape[0] <= self.max_texts
                and not self.failed
                and not torch.cuda.is_current_stream_capturing()
            )
            if not plain:
                if hidden is not None:
                    kwargs["output_hidden_states"] = hidden
                return eager(input_ids, *args, **kwargs)
            assert isinstance(input_ids, torch.Tensor)
            key = (owner, tuple(input_ids.shape), input_ids.dtype, bool(hidden))
            entry = self.captured.get(key) or self._capture(key, eager, input_ids, bool(hidden))
            if entry is None:
                return eager(input_ids, output_hidden_states=hidden)
            entry.input_ids.copy_(input_ids)
            entry.graph.replay()
            return _clone_output(entry.output)

        return forward

    def _capture(self, key: tuple, eager: Callable[..., Any], input_ids: torch.Tensor, hidden: bool) -> CapturedEncoder | None:
        static = input_ids.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                eager(static, output_hidden_states=hidden)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = eager(static, output_hidden_states=hidden)
        except Exception as exc:  # noqa: BLE001 - an encoder that cannot be captured runs as before
            log.warning("CUDA graph capture of a text encoder failed for %s; encoders run without graphs: %s", key, exc)
            self.failed = True
            self.captured.clear()
            self._pool = None
            return None
        log.info("captured a CUDA graph of a text encoder for %s", key[1:])
        entry = self.captured[key] = CapturedEncoder(graph, static, output)
        return entry
