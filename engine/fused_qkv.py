"""Fused Q/K/V for SD3's joint attention: one projection per stream instead of three, and the
image and text queries optionally in two SDPA calls (engine/speed.py turns this on)."""

from __future__ import annotations

import torch

from engine.fp8_attention import Attend, SdpaAttend


class FusedJointProcessor:
    """Joint attention with fused projections: `to_qkv` for the image stream and `to_added_qkv`
    for the text stream. Same math as diffusers' `JointAttnProcessor2_0` (q/k norms included),
    one GEMM per stream instead of three.

    With `split_queries` the image and the text queries attend to the joint keys and values in two
    SDPA calls instead of one over concatenated queries: the same rows of softmax(QKᵀ)V, without
    the copy that joins the queries, and each output comes out in the (batch, tokens, heads, dim)
    order of its queries, so the output projections read it without a transposing copy."""

    def __init__(self, split_queries: bool = False, attend: Attend | None = None) -> None:
        self.split_queries = split_queries
        # How softmax(QKᵀ)V is computed (engine/fp8_attention.py): torch SDPA unless told otherwise.
        self.attend: Attend = attend if attend is not None else SdpaAttend()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = self._project(attn.to_qkv, hidden_states, heads, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is None:
            (image,) = self.attend([q], k, v)
            return attn.to_out[1](attn.to_out[0](self._merge_heads(image, q.dtype)))
        cq, ck, cv = self._project(attn.to_added_qkv, encoder_hidden_states, heads, attn.norm_added_q, attn.norm_added_k)
        k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        if self.split_queries:
            image, text = self.attend([q, cq], k, v)
        else:
            (out,) = self.attend([torch.cat([q, cq], dim=2)], k, v)
            image, text = out[:, :, :image_tokens], out[:, :, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](self._merge_heads(image, q.dtype)))
        text = self._merge_heads(text, q.dtype)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text

    @staticmethod
    def _merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch, heads, tokens, dim = out.shape
        return out.transpose(1, 2).reshape(batch, tokens, heads * dim).to(dtype)

    @staticmethod
    def _project(linear, x, heads, norm_q, norm_k):
        batch, tokens, _ = x.shape
        qkv = linear(x).view(batch, tokens, 3, heads, -1).transpose(1, 3)  # (batch, heads, 3, tokens, dim)
        q, k, v = qkv.unbind(2)
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v


def _attention_modules(transformer: torch.nn.Module):
    return [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


@torch.no_grad()
def fuse_qkv(transformer: torch.nn.Module, split_queries: bool = False, attend: Attend | None = None) -> int:
    """Fuse each attention's Q/K/V weights (and the text stream's) into one linear layer, drop
    the separate ones, and install `FusedJointProcessor` with the `attend` strategy (SDPA by
    default). Returns the modules fused."""
    fused = 0
    for attn in _attention_modules(transformer):
        if getattr(attn, "to_qkv", None) is not None or attn.is_cross_attention:
            continue
        attn.to_qkv = _concat_linears([attn.to_q, attn.to_k, attn.to_v])
        del attn.to_q, attn.to_k, attn.to_v
        if getattr(attn, "add_q_proj", None) is not None:
            attn.to_added_qkv = _concat_linears([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
            del attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
        attn.fused_projections = True
        attn.set_processor(FusedJointProcessor(split_queries, attend))
        fused += 1
    return fused


def _concat_linears(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    first = linears[0]
    out = torch.nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    out.weight.copy_(torch.cat([lin.weight for lin in linears]))
    if first.bias is not None:
        out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out.requires_grad_(False)
