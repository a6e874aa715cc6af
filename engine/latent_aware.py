"""Latent-aware denoising: how a request's update is formed on steps whose transformer output is
stale (CACHED steps). FRESH steps always take the exact flow-match Euler update, so K = 1 is
exactly the exact path whatever the strategy.

Strategies (one interface, chosen per worker with `latent_aware`):
- `none`: the plain Euler update with the (partly) reused velocity.
- `seed`: the seed system's rule. From the latent x: std over (C, H, W); edge = mean
  finite-difference gradient magnitude sqrt(dx^2 + dy^2) on the (H-1) x (W-1) grid;
  adj = (std + 0.3 edge)(1 + 0.3 sigmoid(2 edge)); sigma_tilde = sigma (0.7 + 0.3 sigmoid(adj)),
  used only for the x0 estimate of the x0-form Euler step:
  x0 = x - sigma_tilde v, eps = (x - (1 - sigma) x0) / sigma, x_next = (1 - sigma_next) x0 + sigma_next eps.
  (With sigma_tilde = sigma this is exactly x + (sigma_next - sigma) v.)
- `extrapolate`: ours. Instead of holding the cached quantity constant, extrapolate it to first
  order from its last two fresh values (the attention output in the `attention` policy, the
  velocity in the `step` policy). The update itself is the plain Euler step.
- `extrapolate2`: second order, a quadratic through the last three fresh values (TaylorSeer's
  order-2 finite-difference expansion is the same polynomial), first order until there are three.
- `extrapolate-sigma`, `extrapolate2-sigma`: the same polynomials in the request's sigma instead of
  its step index (the schedule's steps are uneven: with shift 3 the last ones are ~8x the first).
"""

from __future__ import annotations

import torch


def seed_edge(x: torch.Tensor) -> torch.Tensor:
    """Mean finite-difference gradient magnitude per sample: (B,)."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return torch.sqrt(dx * dx + dy * dy).flatten(1).mean(dim=1)


def seed_sigma_tilde(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The seed rule's sigma for the x0 estimate; `sigma` broadcasts as (B, 1, 1, 1)."""
    std = x.flatten(1).std(dim=1)
    edge = seed_edge(x)
    adj = (std + 0.3 * edge) * (1 + 0.3 * torch.sigmoid(2 * edge))
    return sigma * (0.7 + 0.3 * torch.sigmoid(adj)).view(-1, 1, 1, 1)


class LatentAware:
    name = "none"
    corrects_update = False
    order = 0  # of the cached quantity's extrapolation: 0 a hold, 1 linear, 2 quadratic
    clock = "step"  # the extrapolation's variable: "step" (index) or "sigma"

    @property
    def extrapolates(self) -> bool:
        return self.order > 0

    @property
    def history(self) -> int:
        """Fresh values each cached quantity keeps: order + 1."""
        return self.order + 1

    def update(self, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return x + (sigma_next - sigma) * v

    def reuse_velocity(self, state, weight: float, older_weight: float = 0.0) -> torch.Tensor:
        """The velocity a `step`-policy request uses on a CACHED step; `weight`, `older_weight`:
        the plan's extrapolation weights from its last FRESH steps (engine/slots.py)."""
        return state.velocity


class SeedRule(LatentAware):
    name = "seed"
    corrects_update = True

    def update(self, x, v, sigma, sigma_next):
        sigma_tilde = seed_sigma_tilde(x, sigma)
        x0 = x - sigma_tilde * v
        eps = (x - (1 - sigma) * x0) / sigma
        return (1 - sigma_next) * x0 + sigma_next * eps


class Extrapolate(LatentAware):
    name = "extrapolate"
    order = 1

    def reuse_velocity(self, state, weight: float, older_weight: float = 0.0) -> torch.Tensor:
        if state.previous_velocity is None:
            return state.velocity
        v = state.velocity + (state.velocity - state.previous_velocity) * weight
        if older_weight and state.older_velocity is not None:
            v = v + (state.velocity - state.older_velocity) * older_weight
        return v


class Extrapolate2(Extrapolate):
    name = "extrapolate2"
    order = 2


class ExtrapolateSigma(Extrapolate):
    name = "extrapolate-sigma"
    clock = "sigma"


class Extrapolate2Sigma(Extrapolate):
    name = "extrapolate2-sigma"
    order = 2
    clock = "sigma"


STRATEGIES = {cls.name: cls for cls in (LatentAware, SeedRule, Extrapolate, Extrapolate2, ExtrapolateSigma, Extrapolate2Sigma)}


def make_latent_aware(name: str) -> LatentAware:
    if name not in STRATEGIES:
        raise ValueError(f"unknown latent-aware strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()
