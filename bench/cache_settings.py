"""A caching setting as the benches name it: `policy:K:latent_aware[:wN][:fM][:gG]`.

`wN`: the first N steps of a request are FRESH (warm-up, `EngineConfig.warmup_steps`); `fM`: the
last M steps are (`EngineConfig.final_fresh_steps`); `gG`: the bound on a request's CACHED run
grows from 2 after the warm-up to K, one every G steps (`EngineConfig.interval_growth`). Left out, the engine's own values apply.
Used by bench/quality.py (fidelity on the reference model) and bench/memory_parts.py (GPU speed),
so a quality point and its speed-up name the same setting."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import NamedTuple

from engine.config import LATENT_AWARE_STRATEGIES, EngineConfig

POLICIES = ("attention", "step")


class CacheSetting(NamedTuple):
    policy: str  # "exact", "attention" or "step"
    k: int
    latent_aware: str
    warmup: int | None = None
    final: int | None = None
    growth: int | None = None

    @property
    def name(self) -> str:
        """The setting's spec, as parsed (exact for the exact path)."""
        if self.policy == "exact":
            return "exact"
        extra = "".join(f":{letter}{value}" for letter, value in self.options() if value is not None)
        return f"{self.policy}:{self.k}:{self.latent_aware}{extra}"

    def options(self) -> tuple[tuple[str, int | None], ...]:
        return (("w", self.warmup), ("f", self.final), ("g", self.growth))

    def canonical(self, default_warmup: int = 1, default_final: int = 1, default_growth: int = 0) -> str:
        """The name with the engine defaults' wN/fM left out, so that `step:3:none:w1` and
        `step:3:none` (or a quality row's fields) name the same setting."""
        warmup = None if self.warmup == default_warmup else self.warmup
        final = None if self.final == default_final else self.final
        growth = None if self.growth == default_growth else self.growth
        return self._replace(warmup=warmup, final=final, growth=growth).name

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        """`base` with this setting's engine-wide knobs (the request carries K and the policy)."""
        return replace(
            base,
            latent_aware=self.latent_aware,
            cache_policy="attention" if self.policy == "exact" else self.policy,
            warmup_steps=base.warmup_steps if self.warmup is None else self.warmup,
            final_fresh_steps=base.final_fresh_steps if self.final is None else self.final,
            interval_growth=base.interval_growth if self.growth is None else self.growth,
        )


EXACT = CacheSetting("exact", 1, "none")


def parse_setting(item: str) -> CacheSetting:
    """One `policy:K:latent_aware[:wN][:fM]`, each part checked."""
    parts = item.strip().split(":")
    usage = f"{item!r}: want attention|step:K:latent_aware[:wN][:fM][:gG] with K >= 2, N >= 0, M >= 1"
    if len(parts) < 3 or parts[0] not in POLICIES or not parts[1].isdigit() or int(parts[1]) < 2:
        raise argparse.ArgumentTypeError(usage)
    if parts[2] not in LATENT_AWARE_STRATEGIES:
        raise argparse.ArgumentTypeError(f"{item!r}: latent_aware must be one of {', '.join(LATENT_AWARE_STRATEGIES)}")
    options: dict[str, int] = {}
    for option in parts[3:]:
        letter, number = option[:1], option[1:]
        if letter not in ("w", "f", "g") or not number.isdigit() or letter in options:
            raise argparse.ArgumentTypeError(
                f"{item!r}: {option!r} is not w<warm-up steps>, f<final FRESH steps> or g<interval growth>, once each"
            )
        options[letter] = int(number)
    if options.get("f") == 0:
        raise argparse.ArgumentTypeError(f"{item!r}: f0: the last step is always FRESH (f1 at least)")
    return CacheSetting(parts[0], int(parts[1]), parts[2], options.get("w"), options.get("f"), options.get("g"))


def parse_settings(text: str) -> list[CacheSetting]:
    """Comma-separated settings (argparse `type=`)."""
    return [parse_setting(item) for item in text.split(",") if item.strip()] or _none(text)


def _none(text: str) -> list[CacheSetting]:
    raise argparse.ArgumentTypeError(f"{text!r}: no settings given")
