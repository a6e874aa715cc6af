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
layer, whatever the batch, and no per-row Python. Slots and refresh history belong to the
scheduler (engine/slots.py, `ScheduledRequest`); `AttentionCache.begin_step` only turns a step's
plan into index tensors, once per step (`CacheStep`). With compiled blocks all of this is traced into the block's graph;
only a step that creates or grows a pool runs it outside.

With `history=2` a CACHED row gets the first-order extrapolation of its last two fresh
outputs, `a1 + (a1 - a0) * (t - t1) / (t1 - t0)`, in step units, instead of a constant hold;
with `history=3` the quadratic through its last three (engine/slots.py `extrapolation_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.slot_pool import Group, SlotPool, StepRows, merge_cached
from engine.transfers import to_device

if TYPE_CHECKING:
    from engine.scheduler import StepPlan


@dataclass
class CacheStep:
    """One forward's attention-cache context, made by `AttentionCache.begin_step` from the plan
    and passed down explicitly: the runner hands it to engine/graphs.py and to the transformer
    (`joint_attention_kwargs=step.forward_kwargs()`), whose blocks pass it to every attention
    processor. A forward without one takes the plain path."""

    caching: bool  # does this step read or write the cache at all?
    pools_ready: bool = False  # do this step's pools exist at the capacity it needs?
    rows: StepRows | None = None  # this step's index tensors (None when not caching)
    capacity: int = 0  # rows each pool of this size must have (the scheduler's slot table)

    def forward_kwargs(self) -> dict[str, Any]:
        """The transformer's `joint_attention_kwargs` for this step (none for a plain step, so an
        exact forward is exactly diffusers' own)."""
        return {"cache_step": self} if self.caching else {}


class CachingAttnProcessor:
    def __init__(self, owner: "AttentionCache", layer: int, inner) -> None:
        self.owner = owner
        self.layer = layer
        self.inner = inner
        self.pools: dict[Group, SlotPool] = {}
        # This step's pool, set by `begin_step`: a compiled block reads it without a dict lookup
        # keyed by image size, which would guard on the size and recompile for each new one.
        self.active: SlotPool | None = None

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        *args,
        cache_step: CacheStep | None = None,
        **kwargs,
    ):
        # Plain bools, so a compiled block inlines the path taken and guards on nothing else.
        step = cache_step
        if step is None or not step.caching:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if step.pools_ready:
            # Traced into a compiled block: no graph break, and the gathers, the pool writes
            # and the merge fuse with the kernels around them.
            return self._with_cache(False, step, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return self._growing(step, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    @torch.compiler.disable
    def _growing(self, *args, **kwargs):
        """A step that creates or grows a pool (a new request took a slot past the capacity):
        kept out of the compiled graph, which would otherwise trace the allocation."""
        return self._with_cache(True, *args, **kwargs)

    def _with_cache(
        self, grow: bool, step: CacheStep, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        """Gather the FRESH rows into the wrapped processor, take CACHED rows from the pool."""
        rows = step.rows
        assert rows is not None  # a caching step always has its rows
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
                        pool = self.active = self.pools[rows.group] = SlotPool(self.owner.history)
                    if pool.reserve(step.capacity, fresh):
                        self.owner.generation += 1
                assert pool is not None
                pool.store(fresh, rows)
        if rows.cached_index is None:
            assert fresh is not None
            parts = list(fresh)
        else:
            assert pool is not None
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
    """Installs caching processors on every attention module of a transformer and turns each
    step's plan (slots, FRESH/CACHED, extrapolation weights: engine/scheduler.py) into the index
    tensors every layer uses. It keeps no bookkeeping of its own beyond the pools' tensors."""

    def __init__(self, transformer: Any, history: int = 1) -> None:
        """`history`: fresh outputs kept per cached row, 1 (a hold), 2 (linear) or 3 (quadratic)."""
        if history not in (1, 2, 3):
            raise ValueError(f"history must be 1, 2 or 3 fresh outputs, got {history!r}")
        self.history = history
        self.device = next(transformer.parameters()).device
        # Bumped whenever a pool is created, grown or freed: a CUDA graph of a cached step
        # (engine/graphs.py) holds the pools' addresses and is valid for one generation only.
        self.generation = 0
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
        # functions it was inlining when it broke). Reading the step's `caching` and
        # `pools_ready` in a pre-hook of the block puts their guards there, so no other step
        # takes the broken (pool-growing) variant of a compiled block.
        # A second engine on the same pipeline replaces the first one's hooks (which would
        # otherwise keep it, and its cache, alive and run on every forward).
        for handle in getattr(transformer, "_sd3serve_caching_hooks", ()):
            handle.remove()
        transformer._sd3serve_caching_hooks = [
            block.register_forward_pre_hook(_read_step_flags, with_kwargs=True)
            for block in getattr(transformer, "transformer_blocks", [])
        ]

    def begin_step(self, plan: StepPlan, order: list[int]) -> CacheStep:
        """The cache context of one forward of `plan`'s sub-batch, its requests in `order` (indices
        into `plan.requests`, each request's rows side by side)."""
        caching = any(plan.caches(i) for i in order) or not all(plan.computes_attention(i) for i in order)
        if not caching:  # exact rows only: the processors take the plain path
            return CacheStep(caching=False)
        group: Group = plan.key
        capacity = plan.capacity
        halves = self.history
        fresh_pos: list[int] = []
        cached_pos: list[int] = []
        last_rows: list[int] = []  # pool rows of the CACHED rows' last refresh ...
        previous_rows: list[int] = []  # ... of the refresh before it ...
        older_rows: list[int] = []  # ... and of the one before that
        weights: list[float] = []
        older_weights: list[float] = []
        store_from: list[int] = []  # positions among the FRESH rows ...
        store_rows: list[int] = []  # ... and the pool rows they are written to
        position = 0
        for i in order:
            req = plan.requests[i]
            positions = range(position, position + req.rows)
            position += req.rows
            if plan.computes_attention(i):
                if plan.caches(i):
                    # Parts of an extrapolating pool take turns holding the last refresh; the
                    # first refresh goes to all (there is no older one).
                    half = req.fresh_steps % halves
                    targets = range(halves) if req.fresh_steps == 0 else (half,)
                    for row, slot in enumerate(plan.slots[i]):
                        for h in targets:
                            store_from.append(len(fresh_pos) + row)
                            store_rows.append(h * capacity + slot)
                fresh_pos.extend(positions)
                continue
            if not req.refreshes or not plan.slots[i]:
                raise RuntimeError(f"no cached attention for {req.request_id}: its first step must be FRESH")
            last, previous, older = ((req.fresh_steps - back) % halves for back in (1, 2, 3))
            for slot in plan.slots[i]:
                last_rows.append(last * capacity + slot)
                previous_rows.append(previous * capacity + slot)
                older_rows.append(older * capacity + slot)
                weights.append(plan.weights[i])
                older_weights.append(plan.older_weights[i] if plan.older_weights else 0.0)
            cached_pos.extend(positions)
        second_order = halves > 2 and any(w != 0.0 for w in older_weights)
        extrapolating = second_order or (halves > 1 and any(w != 0.0 for w in weights))
        for proc in self.processors:
            proc.active = proc.pools.get(group)
        pools_ready = bool(self.processors) and all(
            p.active is not None and p.active.capacity >= capacity for p in self.processors
        )
        rows = StepRows(
            group=group,
            fresh_index=self._index(fresh_pos),
            cached_index=self._index(cached_pos) if cached_pos else None,
            last_rows=self._index(last_rows) if cached_pos else None,
            previous_rows=self._index(previous_rows) if extrapolating else None,
            weights=self._weights(weights) if extrapolating else None,
            older_rows=self._index(older_rows) if second_order else None,
            older_weights=self._weights(older_weights) if second_order else None,
            store_from=self._index(store_from) if store_from else None,
            store_rows=self._index(store_rows) if store_from else None,
            fresh_first=fresh_pos == list(range(len(fresh_pos))),
        )
        return CacheStep(caching=True, pools_ready=pools_ready, rows=rows, capacity=capacity)

    def _weights(self, weights: list[float]) -> torch.Tensor:
        return to_device(torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1), self.device)

    def _index(self, positions: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(positions, dtype=torch.long), self.device)  # no host sync in the step loop

    @staticmethod
    def freeze_step(step: CacheStep) -> StepRows:
        """Move `step`'s index tensors to buffers of their own, for a CUDA graph to read."""
        assert step.rows is not None
        step.rows = step.rows.clone()
        return step.rows

    @staticmethod
    def load_step(step: CacheStep, frozen: StepRows) -> None:
        """Copy `step`'s indices into `frozen` (a graph's buffers, same signature) and use it."""
        assert step.rows is not None
        if frozen.signature() != step.rows.signature():
            raise ValueError(f"step signature {step.rows.signature()} is not the frozen {frozen.signature()}")
        frozen.copy_from(step.rows)
        step.rows = frozen

    def drop_pools(self, groups) -> None:
        """Free the pools of `groups` (sizes the scheduler's slot table let go of)."""
        for group in groups:
            for proc in self.processors:
                proc.drop(group)

    def allocated_bytes(self) -> int:
        """Bytes of all pools as allocated, free slots included (the scheduler's
        `cache_allocated_bytes` once each pool has grown to its capacity)."""
        return sum(pool.slot_bytes() * pool.capacity for p in self.processors for pool in p.pools.values())


def _read_step_flags(block, args, kwargs):
    """A transformer block's pre-hook: reads the step's flags (see `AttentionCache.__init__`)."""
    step = (kwargs.get("joint_attention_kwargs") or {}).get("cache_step")
    if step is not None and step.caching and step.pools_ready:
        return None
    return None


def attention_cache_bytes(
    transformer_config, latent_hw: tuple[int, int], text_tokens: int, rows: int, element_size: int, history: int
) -> int:
    """Memory one request's attention cache needs: per layer, image + text stream outputs per row
    (SD3.5's dual-attention layers also keep an image-only second output), `history` fresh ones each."""
    patch = transformer_config.patch_size
    image_tokens = (latent_hw[0] // patch) * (latent_hw[1] // patch)
    dim = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    layers = transformer_config.num_layers
    dual = len(getattr(transformer_config, "dual_attention_layers", ()) or ())
    # The last block is context_pre_only: its text stream output is not kept by the block, but
    # the processor still returns it; we store it, so count it.
    per_row = layers * (image_tokens + text_tokens) * dim + dual * image_tokens * dim
    return per_row * rows * element_size * history
