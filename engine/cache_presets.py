"""What a request's `cache_interval` asks for when it names no `cache_policy`. Pure Python.

`cache_interval` is the user's speed-for-fidelity knob. 1 is exact. 2 and 3 are presets: each is
the caching setting measured best on the reference model near its speed-up (bench/results/
caching_frontier.json, 280 held-out prompts): the `step` policy with a warm-up, an interval
that grows after it (engine/fresh_plan.py) and the engine's latent-aware strategy. Other values,
and any request that names its `cache_policy`, keep the literal meaning: the policy at interval K
from the first step after the engine's warm-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachePreset:
    policy: str  # "step" or "attention"
    interval: int  # K: the most CACHED steps in a row is K-1, once the interval has grown
    warmup_steps: int
    interval_growth: int  # the CACHED-run bound grows 2 -> K, +1 every this many steps
    final_fresh_steps: int = 1

    @property
    def setting(self) -> str:
        """The setting's name in bench/cache_settings.py (bench/results/caching_frontier.json)."""
        final = "" if self.final_fresh_steps == 1 else f":f{self.final_fresh_steps}"
        return f"{self.policy}:{self.interval}:extrapolate:w{self.warmup_steps}{final}:g{self.interval_growth}"


CACHE_PRESETS: dict[int, CachePreset] = {
    2: CachePreset("step", 4, warmup_steps=6, interval_growth=4),  # ~1.6x (FLOP-ideal 1.69x)
    3: CachePreset("step", 6, warmup_steps=3, interval_growth=4),  # ~2x (FLOP-ideal 2.12x)
}
