"""CUDA graphs of whole transformer forwards for small batches.

A forward of a few rows at 512² is host-bound even with compiled blocks: the GPU finishes each
kernel before Python has launched the next (about 22 ms of host time per step on an H100, for
about 9 ms of GPU work with two rows). Replaying a captured graph launches the whole forward at
once.

Exact forwards are keyed by their input shapes. A forward with attention-cache rows is keyed
also by its step's index shapes (`StepRows.signature`): the graph reads the indices from buffers
of its own, which each replay refills (`AttentionCache.load_step`; the step's context, a
`CacheStep`, is passed in by the runner), and it holds the addresses of
the cache's pools, so it is valid for one pool generation only (pools are created, grown and freed
outside graphs; the runner replays only steps whose pools are ready).

Each graph is captured on first use after a warm-up run of the same forward (which also computes
that step's result; the replay repeats it, writing the same values to the same pool rows). All
graphs share one memory pool, which is safe because they replay one at a time on one stream and
each output is copied out before the next replay. At most `max_graphs` are held (each keeps its
own input and output buffers); a new shape past that runs without a graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from engine.attention import AttentionCache, CacheStep
from engine.slot_pool import StepRows

log = logging.getLogger(__name__)


@dataclass
class CapturedForward:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]  # static input buffers the graph reads
    output: torch.Tensor  # static output buffer the graph writes
    rows: StepRows | None = None  # static attention-cache indices the graph reads (cached steps)


class ForwardGraphs:
    def __init__(self, transformer: Any, max_tokens: int, attention: AttentionCache | None = None, max_graphs: int = 64) -> None:
        """For a transformer on a CUDA device. `max_tokens`: capture forwards of at most this many
        image tokens (rows × tokens per row); larger forwards keep the GPU busy on their own.
        `attention`: the cache whose cached steps may be captured too."""
        self.transformer = transformer
        self.max_tokens = max_tokens
        self.attention = attention
        self.max_graphs = max_graphs
        self.patch: int = transformer.config.patch_size
        self.captured: dict[Hashable, CapturedForward] = {}
        self.failed = False  # a capture failed once: run everything without graphs
        self._pool: Any = None
        self._generation: int | None = None  # the pool generation of the cached-step graphs held

    def fits(self, rows: int, height: int, width: int) -> bool:
        """Whether forwards of `rows` latents of `height` × `width` are small enough to graph."""
        return not self.failed and rows * (height // self.patch) * (width // self.patch) <= self.max_tokens

    def applies(self, hidden: torch.Tensor, step: CacheStep | None = None) -> bool:
        """Whether a forward of `hidden` runs as a graph. With attention-cache rows (`step`) only
        once the step's pools exist at the size it needs."""
        if step is not None and step.caching and not step.pools_ready:
            return False
        rows, _, height, width = hidden.shape
        return self.fits(rows, height, width)

    def __call__(self, step: CacheStep | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """The transformer's output for `inputs` (hidden_states, timestep, encoder_hidden_states,
        pooled_projections), by graph replay; `step`: this forward's attention-cache context."""
        key: Hashable = (tuple(inputs["hidden_states"].shape), tuple(inputs["encoder_hidden_states"].shape))
        cache = self.attention
        caching = cache is not None and step is not None and step.caching
        if caching:
            assert cache is not None and step is not None and step.rows is not None
            if cache.generation != self._generation:
                self._drop_cached_steps()
                self._generation = cache.generation
            key = (key, step.rows.signature())
        entry = self.captured.get(key)
        if entry is None:
            if len(self.captured) >= self.max_graphs:
                return self._forward(inputs, step)
            entry = self._capture(key, inputs, step if caching else None)
            if entry is None:
                return self._forward(inputs, step)
        elif entry.rows is not None:
            assert step is not None
            AttentionCache.load_step(step, entry.rows)
        for name, value in inputs.items():
            entry.inputs[name].copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def clear(self) -> None:
        """Free every graph (and, once nothing else holds it, the memory they share)."""
        self.captured.clear()
        self._pool = None

    def _drop_cached_steps(self) -> None:
        for key in [k for k, entry in self.captured.items() if entry.rows is not None]:
            del self.captured[key]
        if not self.captured:
            # The handle holds no reference: once its last graph is gone the allocator frees the
            # pool, and capturing into the stale handle trips its assert (use_count > 0, seen on
            # an H200 with torch 2.11), leaving the CUDA generator stuck in capture mode.
            self._pool = None

    def _forward(self, inputs: dict[str, torch.Tensor], step: CacheStep | None = None) -> torch.Tensor:
        extra = {} if step is None else step.forward_kwargs()
        if extra:
            return self.transformer(**inputs, joint_attention_kwargs=extra, return_dict=False)[0]
        return self.transformer(**inputs, return_dict=False)[0]

    def _capture(self, key: Hashable, inputs: dict[str, torch.Tensor], step: CacheStep | None) -> CapturedForward | None:
        static = {name: value.clone() for name, value in inputs.items()}
        rows = AttentionCache.freeze_step(step) if step is not None else None
        try:
            # Warm-up on a side stream (as torch.cuda.graphs asks): lazy cuBLAS/cuDNN set-up
            # and any first-shape work happen outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(static, step)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(static, step)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: no graphs, same results
            log.warning("CUDA graph capture failed for %s; forwards run without graphs: %s", key, exc)
            self.failed = True
            self.clear()
            return None
        log.info("captured a CUDA graph of the transformer forward for %s", key)
        entry = self.captured[key] = CapturedForward(graph, static, output, rows)
        return entry
