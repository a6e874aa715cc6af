"""Analytic FLOPs of an SD3 transformer step, split into the attention sublayer and the rest.

Per layer and per row, with D the inner width, Tx image tokens, Tc text tokens, T = Tx + Tc:
attention = Q/K/V projections 6 D^2 T + SDPA 4 T^2 D + output projections 2 D^2 T;
the rest = MLPs 16 D^2 T (4x hidden, both streams) + adaLN modulation ~24 D^2.
SD3.5's dual-attention layers add an image-only attention (8 D^2 Tx + 4 Tx^2 D).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepFlops:
    attention: float  # per row per step
    other: float

    @property
    def total(self) -> float:
        return self.attention + self.other

    @property
    def attention_share(self) -> float:
        return self.attention / self.total


def step_flops(config, latent_hw: tuple[int, int], text_tokens: int) -> StepFlops:
    patch = config.patch_size
    tx = (latent_hw[0] // patch) * (latent_hw[1] // patch)
    t = tx + text_tokens
    d = config.num_attention_heads * config.attention_head_dim
    layers = config.num_layers
    dual = len(getattr(config, "dual_attention_layers", ()) or ())
    attention = layers * (8 * d * d * t + 4 * t * t * d) + dual * (8 * d * d * tx + 4 * tx * tx * d)
    other = layers * (16 * d * d * t + 24 * d * d)
    other += 2 * tx * d * patch * patch * config.in_channels * 2  # patch embedding and final projection
    return StepFlops(float(attention), float(other))


def flop_fraction(flops: StepFlops, fresh_steps: int, cached_steps: int, policy: str) -> float:
    """Work of one request relative to running every step exactly."""
    total = (fresh_steps + cached_steps) * flops.total
    if policy == "step":
        spent = fresh_steps * flops.total  # CACHED steps skip the transformer
    else:
        spent = fresh_steps * flops.total + cached_steps * flops.other
    return spent / total
