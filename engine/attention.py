"""Attention caching for SD3's joint transformer blocks.

`CachingAttnProcessor` wraps whatever processor an attention module already has (diffusers'
`JointAttnProcessor2_0`, its fused-QKV variant, or the image-only `attn2` of SD3.5 blocks).
For each forward the runner says, per row, whether it is FRESH (compute attention, refresh the
cache) or CACHED (reuse the stored output). Only FRESH rows are gathered into the wrapped
processor, so only they pay for the Q/K/V projections and SDPA; CACHED rows get their stored
outputs (image and text streams, after the output projections) scattered back. Norms,
modulation and MLPs outside the attention module run for every row with its own timestep.

With `extrapolate=True` a CACHED row gets the first-order extrapolation of its last two fresh
outputs, `a1 + (a1 - a0) * (t - t1) / (t1 - t0)`, in step units, instead of a constant hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CacheKey = tuple[str, int]  # (request id, row within the request: 0 uncond / 1 cond)


@dataclass
class CachedOutput:
    outputs: tuple[torch.Tensor, ...]  # (image stream,) or (image stream, text stream); each (1, seq, dim)
    step: int
    previous: tuple[torch.Tensor, ...] | None = None
    previous_step: int = 0


@dataclass
class StepRows:
    keys: list[CacheKey]
    fresh: list[bool]
    steps: list[int]
    fresh_positions: list[int] = field(default_factory=list)
    cached_positions: list[int] = field(default_factory=list)
    fresh_index: torch.Tensor | None = None
    cached_index: torch.Tensor | None = None


class CachingAttnProcessor:
    def __init__(self, owner: "AttentionCache", layer: int, inner) -> None:
        self.owner = owner
        self.layer = layer
        self.inner = inner
        self.store: dict[CacheKey, CachedOutput] = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # A plain bool, so a compiled block inlines the exact path and guards on nothing else.
        if not self.owner.caching:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return self._with_cache(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    @torch.compiler.disable
    def _with_cache(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        """Gather the FRESH rows into the wrapped processor, scatter cached outputs back. Runs
        outside any compiled graph (its bookkeeping is Python); `owner.fresh_attention` may be
        a compiled version of the wrapped processor."""
        rows = self.owner.current
        inner = self.owner.fresh_attention or self.inner
        if rows.cached_index is None:  # every row FRESH
            out = inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            self._remember(out if isinstance(out, tuple) else (out,), list(range(len(rows.keys))), rows)
            return out
        fi, ci = rows.fresh_index, rows.cached_index
        n_out = 2 if encoder_hidden_states is not None else 1
        cached = self._recall(rows, n_out)
        if fi.numel() == 0:
            parts = cached
        else:
            sub = inner(
                attn,
                hidden_states.index_select(0, fi),
                None if encoder_hidden_states is None else encoder_hidden_states.index_select(0, fi),
                attention_mask,
                *args,
                **kwargs,
            )
            sub = sub if isinstance(sub, tuple) else (sub,)
            self._remember(sub, [int(i) for i in rows.fresh_positions], rows)
            parts = []
            for fresh_part, cached_part in zip(sub, cached):
                full = fresh_part.new_empty((len(rows.keys),) + tuple(fresh_part.shape[1:]))
                full.index_copy_(0, fi, fresh_part)
                full.index_copy_(0, ci, cached_part)
                parts.append(full)
        return tuple(parts) if n_out == 2 else parts[0]

    def _remember(self, outputs: tuple[torch.Tensor, ...], positions: list[int], rows: StepRows) -> None:
        for j, pos in enumerate(positions):
            key = rows.keys[pos]
            if key not in self.owner.caching_keys:
                continue
            new = tuple(o[j : j + 1] for o in outputs)
            old = self.store.get(key)
            if self.owner.extrapolate and old is not None:
                self.store[key] = CachedOutput(new, rows.steps[pos], old.outputs, old.step)
            else:
                self.store[key] = CachedOutput(new, rows.steps[pos])

    def _recall(self, rows: StepRows, n_out: int) -> list[torch.Tensor]:
        per_row = []
        for pos in rows.cached_positions:
            entry = self.store.get(rows.keys[pos])
            if entry is None:
                raise RuntimeError(f"no cached attention for {rows.keys[pos]} in layer {self.layer}")
            per_row.append(self._value(entry, rows.steps[pos]))
        return [torch.cat([r[k] for r in per_row]) for k in range(n_out)]

    def _value(self, entry: CachedOutput, step: int) -> tuple[torch.Tensor, ...]:
        if entry.previous is None or entry.step == entry.previous_step:
            return entry.outputs
        w = (step - entry.step) / (entry.step - entry.previous_step)
        return tuple(a1 + (a1 - a0) * w for a1, a0 in zip(entry.outputs, entry.previous))

    def release(self, request_id: str) -> None:
        for key in [k for k in self.store if k[0] == request_id]:
            del self.store[key]


class AttentionCache:
    """Installs caching processors on every attention module of a transformer."""

    def __init__(self, transformer: torch.nn.Module, extrapolate: bool = False, compile_fresh=None) -> None:
        """`compile_fresh`: a function that compiles the FRESH-rows attention call (engine/speed.py
        passes one when the blocks are compiled), or None to run it eagerly."""
        self.extrapolate = extrapolate
        self.device = next(transformer.parameters()).device
        self.current: StepRows | None = None
        self.caching = False  # does this step read or write the cache at all?
        self.fresh_attention = None
        self.caching_keys: set[CacheKey] = set()
        self.processors: list[CachingAttnProcessor] = []
        modules = [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
        for layer, module in enumerate(modules):
            inner = module.processor
            if isinstance(inner, CachingAttnProcessor):  # a second engine on the same pipeline
                inner = inner.inner
            proc = CachingAttnProcessor(self, layer, inner)
            module.set_processor(proc)
            self.processors.append(proc)
        # A compiled block breaks its graph at the attention call on cached steps, and a frame
        # that breaks keeps only the guards traced before the break. Reading `caching` in a hook
        # on the block's first norm puts the guard there, so exact steps never take the broken
        # (cached-step) variant of a compiled block.
        for block in getattr(transformer, "transformer_blocks", []):
            if hasattr(block, "norm1"):
                block.norm1.register_forward_pre_hook(self._read_caching_flag)
        if compile_fresh is not None and self.processors:
            # One compiled function for all layers: it calls the module's own wrapped processor.
            self.fresh_attention = compile_fresh(_call_inner)

    def _read_caching_flag(self, module, args):
        if self.caching:
            return None
        return None

    def begin_step(self, row_ids: list[str], row_fresh: list[bool], row_steps: list[int], row_caches: list[bool]) -> None:
        keys: list[CacheKey] = []
        seen: dict[str, int] = {}
        for rid in row_ids:
            keys.append((rid, seen.get(rid, 0)))
            seen[rid] = seen.get(rid, 0) + 1
        self.caching_keys = {k for k, c in zip(keys, row_caches) if c}
        self.caching = bool(self.caching_keys) or not all(row_fresh)
        if not self.caching:  # exact rows only: the processors take the plain path
            self.current = None
            return
        rows = StepRows(
            keys,
            row_fresh,
            row_steps,
            fresh_positions=[i for i, f in enumerate(row_fresh) if f],
            cached_positions=[i for i, f in enumerate(row_fresh) if not f],
        )
        if rows.cached_positions:
            rows.fresh_index = self._index(rows.fresh_positions)
            rows.cached_index = self._index(rows.cached_positions)
        self.current = rows

    def _index(self, positions: list[int]) -> torch.Tensor:
        """Row indices on the device without a host synchronisation (pinned, asynchronous copy)."""
        index = torch.tensor(positions, dtype=torch.long)
        if self.device.type != "cuda":
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    def end_step(self) -> None:
        self.current = None
        self.caching = False

    def release(self, request_id: str) -> None:
        for proc in self.processors:
            proc.release(request_id)

    def nbytes(self) -> int:
        total = 0
        for proc in self.processors:
            for entry in proc.store.values():
                for group in (entry.outputs, entry.previous or ()):
                    total += sum(t.numel() * t.element_size() for t in group)
        return total


def _call_inner(attn, *args, **kwargs):
    return attn.processor.inner(attn, *args, **kwargs)


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
