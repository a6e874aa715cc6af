"""Attention caching for SD3's joint transformer blocks.

`CachingAttnProcessor` wraps whatever processor an attention module already has (diffusers'
`JointAttnProcessor2_0`, its fused-QKV variant, or the image-only `attn2` of SD3.5 blocks).
For each forward the runner says, per row, whether it is FRESH (compute attention, refresh the
cache) or CACHED (reuse the stored output). Only FRESH rows are gathered into the wrapped
processor, so only they pay for the Q/K/V projections and SDPA; CACHED rows get their stored
outputs (image and text streams, after the output projections). Norms, modulation and MLPs
outside the attention module run for every row with its own timestep.

Storage is one tensor per layer, output stream and image size with one slot per cached row
(`SlotPool`, engine/slot_pool.py): a step costs a fixed handful of gather/scatter kernels per
layer, whatever the batch, and no per-row Python. Slots and refresh steps are bookkept once per step
by `AttentionCache.begin_step`. With compiled blocks all of this is traced into the block's graph;
only a step that creates or grows a pool runs it outside.

With `extrapolate=True` a CACHED row gets the first-order extrapolation of its last two fresh
outputs, `a1 + (a1 - a0) * (t - t1) / (t1 - t0)`, in step units, instead of a constant hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.slot_pool import Group, SlotPool, StepRows, merge_cached
from engine.transfers import to_device

CacheKey = tuple[str, int]  # (request id, row within the request: 0 uncond / 1 cond)


@dataclass
class SlotHistory:
    slot: int
    step: int  # step of the last refresh
    previous_step: int | None = None  # step of the refresh before it
    half: int = 0  # which half of an extrapolating pool holds the last refresh


class CachingAttnProcessor:
    def __init__(self, owner: "AttentionCache", layer: int, inner) -> None:
        self.owner = owner
        self.layer = layer
        self.inner = inner
        self.pools: dict[Group, SlotPool] = {}
        # This step's pool, set by `begin_step`: a compiled block reads it without a dict lookup
        # keyed by image size, which would guard on the size and recompile for each new one.
        self.active: SlotPool | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # Plain bools, so a compiled block inlines the path taken and guards on nothing else.
        if not self.owner.caching:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.owner.pools_ready:
            # Traced into a compiled block: no graph break, and the gathers, the pool writes
            # and the merge fuse with the kernels around them.
            return self._with_cache(False, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return self._growing(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    @torch.compiler.disable
    def _growing(self, *args, **kwargs):
        """A step that creates or grows a pool (a new request took a slot past the capacity):
        kept out of the compiled graph, which would otherwise trace the allocation."""
        return self._with_cache(True, *args, **kwargs)

    def _with_cache(self, grow: bool, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                    *args, **kwargs):
        """Gather the FRESH rows into the wrapped processor, take CACHED rows from the pool."""
        rows = self.owner.current
        pool = self.active
        if rows.cached_index is not None and pool is None:
            raise RuntimeError(f"no cached attention for group {rows.group} in layer {self.layer}")
        fresh = None
        if rows.fresh_index.numel():
            if rows.cached_index is None:
                fresh_in = (hidden_states, encoder_hidden_states)
            else:
                fresh_in = (
                    rows.fresh_rows(hidden_states),
                    None if encoder_hidden_states is None else rows.fresh_rows(encoder_hidden_states),
                )
            fresh = self.inner(attn, *fresh_in, attention_mask, *args, **kwargs)
            fresh = fresh if isinstance(fresh, tuple) else (fresh,)
            if rows.store_rows is not None:
                if grow:
                    if pool is None:
                        pool = self.active = self.pools[rows.group] = SlotPool(2 if self.owner.extrapolate else 1)
                    if pool.reserve(self.owner.capacity(rows.group), fresh):
                        self.owner.generation += 1
                pool.store(fresh, rows)
        if rows.cached_index is None:
            parts = list(fresh)
        else:
            parts = [
                merge_cached(None if fresh is None else fresh[k], data, hidden_states.shape[0], rows)
                for k, data in enumerate(pool.data)
            ]
        return tuple(parts) if len(parts) > 1 else parts[0]

    def drop(self, group: Group) -> None:
        if self.pools.pop(group, None) is not None:
            self.owner.generation += 1
        self.active = None  # or the dropped pool's memory stays held until the next cached step


class AttentionCache:
    """Installs caching processors on every attention module of a transformer and keeps the
    per-step bookkeeping: which slot holds which row, and when each row was last refreshed."""

    def __init__(self, transformer: torch.nn.Module, extrapolate: bool = False) -> None:
        self.extrapolate = extrapolate
        self.device = next(transformer.parameters()).device
        self.current: StepRows | None = None
        self.caching = False  # does this step read or write the cache at all?
        self.pools_ready = False  # do this step's pools exist at the capacity it needs?
        # Bumped whenever a pool is created, grown or freed: a CUDA graph of a cached step
        # (engine/graphs.py) holds the pools' addresses and is valid for one generation only.
        self.generation = 0
        self.history: dict[Group, dict[CacheKey, SlotHistory]] = {}
        self._capacity: dict[Group, int] = {}
        self.processors: list[CachingAttnProcessor] = []
        modules = [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
        for layer, module in enumerate(modules):
            inner = module.processor
            if isinstance(inner, CachingAttnProcessor):  # a second engine on the same pipeline
                inner = inner.inner
            proc = CachingAttnProcessor(self, layer, inner)
            module.set_processor(proc)
            self.processors.append(proc)
        # A compiled block breaks its graph at the attention call on steps that grow a pool, and a
        # frame that breaks keeps only the guards traced before the break (not those of the
        # functions it was inlining when it broke). Reading `caching` and
        # `pools_ready` in a hook on the block's first norm puts their guards there, so no other
        # step takes the broken (pool-growing) variant of a compiled block.
        # A second engine on the same pipeline replaces the first one's hooks (which would
        # otherwise keep it, and its cache, alive and run on every forward).
        for handle in getattr(transformer, "_sd3serve_caching_hooks", ()):
            handle.remove()
        transformer._sd3serve_caching_hooks = [
            block.norm1.register_forward_pre_hook(self._read_step_flags)
            for block in getattr(transformer, "transformer_blocks", [])
            if hasattr(block, "norm1")
        ]

    def _read_step_flags(self, module, args):
        if self.caching and self.pools_ready:
            return None
        return None

    def begin_step(self, row_ids: list[str], row_fresh: list[bool], row_steps: list[int], row_caches: list[bool],
                   group: Group = ()) -> None:
        """Rows of one sub-batch (all of one image size, `group`): request id, FRESH or not, the
        request's step, and whether the row keeps a cache (the `attention` policy)."""
        keys: list[CacheKey] = []
        seen: dict[str, int] = {}
        for rid in row_ids:
            keys.append((rid, seen.get(rid, 0)))
            seen[rid] = seen.get(rid, 0) + 1
        # An idle size's pools (kept for its CUDA graphs) go as soon as another size runs.
        self._free_idle_pools(keep=group)
        self.caching = any(row_caches) or not all(row_fresh)
        if not self.caching:  # exact rows only: the processors take the plain path
            self.current = None
            return
        history = self.history.setdefault(group, {})
        fresh_pos = [i for i, f in enumerate(row_fresh) if f]
        cached_pos = [i for i, f in enumerate(row_fresh) if not f]
        cached_entries, weights = [], []
        for i in cached_pos:
            entry = history.get(keys[i])
            if entry is None:
                raise RuntimeError(f"no cached attention for {keys[i]}: its first step must be FRESH")
            cached_entries.append(entry)
            if entry.previous_step is None or entry.previous_step == entry.step:
                weights.append(0.0)
            else:
                weights.append((row_steps[i] - entry.step) / (entry.step - entry.previous_step))
        stored: list[tuple[int, SlotHistory, bool]] = []  # (position among FRESH rows, entry, first?)
        for j, i in enumerate(fresh_pos):
            if not row_caches[i]:
                continue
            entry = history.get(keys[i])
            first = entry is None
            if first:
                entry = history[keys[i]] = SlotHistory(self._free_slot(group), row_steps[i])
            else:
                entry.previous_step, entry.step = entry.step, row_steps[i]
                if self.extrapolate:
                    entry.half = 1 - entry.half  # overwrite the older refresh
            stored.append((j, entry, first))
        # Pool rows come after slot assignment: the capacity may just have grown.
        capacity = self.capacity(group)
        last_row = lambda e: e.half * capacity + e.slot  # noqa: E731
        other_row = lambda e: (1 - e.half) * capacity + e.slot  # noqa: E731
        store_from: list[int] = []  # positions among the FRESH rows ...
        store_rows: list[int] = []  # ... and the pool rows they are written to
        for j, entry, first in stored:
            store_from.append(j)
            store_rows.append(last_row(entry))
            if first and self.extrapolate:  # no earlier refresh: both halves start equal
                store_from.append(j)
                store_rows.append(other_row(entry))
        extrapolating = self.extrapolate and any(w != 0.0 for w in weights)
        for proc in self.processors:
            proc.active = proc.pools.get(group)
        self.pools_ready = bool(self.processors) and all(
            p.active is not None and p.active.capacity >= capacity for p in self.processors
        )
        self.current = StepRows(
            group=group,
            fresh_index=self._index(fresh_pos),
            cached_index=self._index(cached_pos) if cached_pos else None,
            last_rows=self._index([last_row(e) for e in cached_entries]) if cached_pos else None,
            previous_rows=self._index([other_row(e) for e in cached_entries]) if extrapolating else None,
            weights=to_device(torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1), self.device) if extrapolating else None,
            store_from=self._index(store_from) if stored else None,
            store_rows=self._index(store_rows) if stored else None,
            fresh_first=fresh_pos == list(range(len(fresh_pos))),
        )

    def _free_slot(self, group: Group) -> int:
        used = {e.slot for e in self.history[group].values()}
        slot = next(s for s in range(len(used) + 1) if s not in used)
        self._capacity[group] = max(self._capacity.get(group, 0), slot + 1)
        return slot

    def capacity(self, group: Group) -> int:
        """Slots a pool of `group` must have: the most rows cached at once since it was created."""
        return self._capacity.get(group, 0)

    def _index(self, positions: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(positions, dtype=torch.long), self.device)  # no host sync in the step loop

    def end_step(self) -> None:
        self.current = None
        self.caching = False
        self.pools_ready = False

    def freeze_step(self) -> StepRows:
        """Move this step's index tensors to buffers of their own, for a CUDA graph to read."""
        self.current = self.current.clone()
        return self.current

    def load_step(self, frozen: StepRows) -> None:
        """Copy this step's indices into `frozen` (a graph's buffers, same signature) and use it."""
        if frozen.signature() != self.current.signature():
            raise ValueError(f"step signature {self.current.signature()} is not the frozen {frozen.signature()}")
        frozen.copy_from(self.current)
        self.current = frozen

    def release(self, request_id: str) -> None:
        # A size whose last cached request left keeps its pools (and the CUDA graphs captured on
        # them) for the next requests of that size; a step of another size, or `trim`, frees them.
        for history in self.history.values():
            for key in [k for k in history if k[0] == request_id]:
                del history[key]

    def trim(self) -> None:
        """Free the pools of every size no running request uses."""
        self._free_idle_pools(keep=None)

    def _free_idle_pools(self, keep: Group | None) -> None:
        for group in [g for g, history in self.history.items() if not history and g != keep]:
            del self.history[group]
            self._capacity.pop(group, None)
            for proc in self.processors:
                proc.drop(group)

    def nbytes(self) -> int:
        """Bytes holding the outputs of the rows cached now (what the admission budget counts)."""
        total = 0
        for group, history in self.history.items():
            slot_bytes = sum(p.pools[group].slot_bytes() for p in self.processors if group in p.pools)
            total += slot_bytes * len(history)
        return total

    def allocated_bytes(self) -> int:
        """Bytes of all pools, free slots included (at most the peak of `nbytes` since each size's
        pool was last empty)."""
        return sum(pool.slot_bytes() * pool.capacity for p in self.processors for pool in p.pools.values())


def attention_cache_bytes(transformer_config, latent_hw: tuple[int, int], text_tokens: int, rows: int,
                          element_size: int, extrapolate: bool) -> int:
    """Memory one request's attention cache needs: per layer, image + text stream outputs per row
    (SD3.5's dual-attention layers also keep an image-only second output)."""
    patch = transformer_config.patch_size
    image_tokens = (latent_hw[0] // patch) * (latent_hw[1] // patch)
    dim = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    layers = transformer_config.num_layers
    dual = len(getattr(transformer_config, "dual_attention_layers", ()) or ())
    # The last block is context_pre_only: its text stream output is not kept by the block, but
    # the processor still returns it; we store it, so count it.
    per_row = layers * (image_tokens + text_tokens) * dim + dual * image_tokens * dim
    return per_row * rows * element_size * (2 if extrapolate else 1)
