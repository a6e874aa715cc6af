"""CUDA graphs of whole transformer forwards for small batches.

A forward of a few rows at 512² is host-bound even with compiled blocks: the GPU finishes each
kernel before Python has launched the next (about 22 ms of host time per step on an H100, for
about 9 ms of GPU work with two rows). Replaying a captured graph launches the whole forward at
once. Only exact forwards are captured (no attention-cache rows: their pools and indices change
from step to step); the `step` policy's forwards are exact ones.

One graph per input shape (rows, latent size, text tokens), captured on first use after a
warm-up run of the same shape. All graphs share one memory pool, which is safe because they
replay one at a time on one stream and each output is copied out before the next replay.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (latents, text embeddings)


@dataclass
class CapturedForward:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]  # static input buffers the graph reads
    output: torch.Tensor  # static output buffer the graph writes


class ForwardGraphs:
    def __init__(self, transformer: torch.nn.Module, max_tokens: int) -> None:
        """For a transformer on a CUDA device. `max_tokens`: capture forwards of at most this many image tokens (rows × tokens per
        row); larger forwards keep the GPU busy on their own."""
        self.transformer = transformer
        self.max_tokens = max_tokens
        self.patch = transformer.config.patch_size
        self.captured: dict[Shape, CapturedForward] = {}
        self.failed = False  # a capture failed once: run everything without graphs
        self._pool = None

    def applies(self, hidden: torch.Tensor) -> bool:
        rows, _, height, width = hidden.shape
        tokens = rows * (height // self.patch) * (width // self.patch)
        return not self.failed and tokens <= self.max_tokens

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The transformer's output for `inputs` (hidden_states, timestep, encoder_hidden_states,
        pooled_projections), by graph replay."""
        shape = (tuple(inputs["hidden_states"].shape), tuple(inputs["encoder_hidden_states"].shape))
        entry = self.captured.get(shape)
        if entry is None:
            entry = self._capture(shape, inputs)
            if entry is None:
                return self._forward(inputs)
        for name, value in inputs.items():
            entry.inputs[name].copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer(**inputs, return_dict=False)[0]

    def _capture(self, shape: Shape, inputs: dict[str, torch.Tensor]) -> CapturedForward | None:
        static = {name: value.clone() for name, value in inputs.items()}
        try:
            # Warm-up on a side stream (as torch.cuda.graphs asks): lazy cuBLAS/cuDNN set-up
            # and any first-shape work happen outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(static)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(static)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: no graphs, same results
            log.warning("CUDA graph capture failed for %s; forwards run without graphs: %s", shape, exc)
            self.failed = True
            self.captured.clear()
            return None
        log.info("captured a CUDA graph of the transformer forward for %s", shape)
        entry = self.captured[shape] = CapturedForward(graph, static, output)
        return entry
