"""Storage of the attention cache: per layer, output stream and image size one tensor with a
slot per cached row (`SlotPool`), the per-step index set every layer uses (`StepRows`), and the
gather/extrapolate/merge of CACHED rows (`merge_cached`, traced into the compiled blocks)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

Group = tuple[int, ...]  # rows of one image size share a pool (the latent's spatial shape)


@dataclass
class StepRows:
    """What every layer needs for one step, built once by `AttentionCache.begin_step`. Pool
    indices are rows of the pool tensors (see `SlotPool`)."""

    group: Group
    fresh_index: torch.Tensor  # positions of FRESH rows in the batch
    cached_index: torch.Tensor | None  # positions of CACHED rows, None when every row is FRESH
    last_rows: torch.Tensor | None  # pool rows of the CACHED rows' last refresh
    previous_rows: torch.Tensor | None  # ... and of the refresh before it (extrapolation only)
    weights: torch.Tensor | None  # (n_cached, 1, 1) extrapolation weights, None for a hold
    # Positions among the FRESH rows whose outputs are kept, and the pool rows they are written
    # to (a row cached for the first time is written to both halves when extrapolating).
    store_from: torch.Tensor | None
    store_rows: torch.Tensor | None
    # Second-order extrapolation only: pool rows of the refresh before `previous_rows`, and weights.
    older_rows: torch.Tensor | None = None
    older_weights: torch.Tensor | None = None
    # FRESH rows come first in the batch (the runner orders them so): they are a slice of the
    # input, and the merge is a concatenation the compiler fuses into the residual that reads it.
    fresh_first: bool = False

    def _tensors(self) -> list[tuple[str, torch.Tensor | None]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name not in ("group", "fresh_first")]

    def signature(self) -> tuple:
        """Everything but the tensors' values: what a CUDA graph of the step is specific to."""
        shapes = tuple(None if t is None else tuple(t.shape) for _, t in self._tensors())
        return (self.group, self.fresh_first) + shapes

    def fresh_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The FRESH rows of a batch-first tensor."""
        if self.fresh_first:
            return batch[: self.fresh_index.shape[0]]
        return batch.index_select(0, self.fresh_index)

    def clone(self) -> "StepRows":
        clones: dict[str, Any] = {name: None if t is None else t.clone() for name, t in self._tensors()}
        return replace(self, **clones)

    def copy_from(self, other: "StepRows") -> None:
        """Take `other`'s values (same signature) into these tensors, in place."""
        for name, t in self._tensors():
            if t is not None:
                t.copy_(getattr(other, name), non_blocking=True)


class SlotPool:
    """One layer's cached outputs for one image size: per output stream k a tensor of shape
    (halves * capacity, seq_k, dim_k), `halves` the refreshes kept (1 for a hold, 2 or 3 when
    extrapolating). Slot s has rows s, capacity + s, ..., which take turns holding the last
    refresh: a refresh overwrites the oldest in place, so keeping several costs no copy."""

    def __init__(self, halves: int) -> None:
        self.halves = halves
        self.data: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        return self.data[0].shape[0] // self.halves if self.data else 0

    def slot_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.data) * self.halves

    def reserve(self, capacity: int, like: tuple[torch.Tensor, ...]) -> bool:
        """Grow to `capacity` slots, keeping what is stored; returns whether it grew. Pools are
        per layer, so growing holds two copies of one layer's pool at most, not of the whole cache."""
        old = self.capacity
        if capacity <= old:
            return False
        grown = []
        for k, out in enumerate(like):
            new = out.new_zeros((self.halves * capacity,) + tuple(out.shape[1:]))
            for h in range(self.halves if old else 0):
                new[h * capacity : h * capacity + old].copy_(self.data[k][h * old : (h + 1) * old])
            grown.append(new)
        self.data = grown
        return True

    def store(self, outputs: tuple[torch.Tensor, ...], rows: StepRows) -> None:
        for data, out in zip(self.data, outputs):
            data[rows.store_rows] = out[rows.store_from]  # in place, also inside a compiled graph


def merge_cached(fresh: torch.Tensor | None, data: torch.Tensor, rows: int, step: StepRows) -> torch.Tensor:
    """The full batch of one output stream: FRESH rows from `fresh`, CACHED rows from the pool
    (held, or extrapolated `a2 + (a2 - a1) * w + (a2 - a0) * w_older`). When compiled, one fused
    kernel, or none of
    its own with FRESH rows first (the concatenation is read where the output is used)."""
    assert step.last_rows is not None  # a step with CACHED rows
    cached = data.index_select(0, step.last_rows)
    if step.weights is not None:
        assert step.previous_rows is not None
        last = cached
        cached = cached + (last - data.index_select(0, step.previous_rows)) * step.weights
        if step.older_weights is not None:
            assert step.older_rows is not None
            cached = cached + (last - data.index_select(0, step.older_rows)) * step.older_weights
        cached = cached.to(data.dtype)
    if fresh is None:
        return cached  # every row CACHED: positions are 0..rows-1 in order
    if step.fresh_first:
        return torch.cat([fresh, cached])
    full = fresh.new_empty((rows,) + tuple(fresh.shape[1:]))
    full.index_copy_(0, step.fresh_index, fresh)
    assert step.cached_index is not None
    full.index_copy_(0, step.cached_index, cached)
    return full
