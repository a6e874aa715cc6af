"""Which requests compute attention (FRESH) in one step of a sub-batch: the staleness bounds,
the budget of about sum 1/K_i refreshes per step, and the most stale first. Pure Python.

A request's interval K bounds its run of CACHED steps (at most K-1). With `growth` > 0 the bound
starts at 2 after the warm-up and grows by one every `growth` steps up to K: a request's early
steps decide its layout and its velocity changes fastest then, its late ones refine detail along
a nearly straight path, so refreshes go where extrapolating the cached velocity costs most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler import ScheduledRequest


def own(value: int | None, default: int) -> int:
    """A request's own schedule knob (engine/cache_presets.py) or the scheduler's."""
    return default if value is None else value


def current_interval(req: ScheduledRequest, warmup_steps: int = 1, growth: int = 0) -> int:
    """The interval bounding `req`'s CACHED run at its current step."""
    warmup_steps, growth = own(req.warmup_steps, warmup_steps), own(req.interval_growth, growth)
    if growth <= 0 or req.interval <= 2:
        return req.interval
    return min(req.interval, 2 + max(0, req.step - max(warmup_steps, 1)) // growth)


def forced_fresh(req: ScheduledRequest, warmup_steps: int, final_steps: int = 1, growth: int = 0) -> bool:
    """Steps where a request must compute attention whatever the budget: the first
    `warmup_steps` and the last `final_steps` (at least one each), and the staleness bound."""
    warmup_steps, final_steps = own(req.warmup_steps, warmup_steps), own(req.final_fresh_steps, final_steps)
    return (
        req.policy == "exact"
        or req.interval <= 1
        or req.step < max(warmup_steps, 1)  # new requests and the warm-up
        or req.step >= req.total - max(final_steps, 1)  # the last steps (final detail)
        or req.steps_since_fresh >= current_interval(req, warmup_steps, growth) - 1  # staleness bound
    )


def fresh_share(requests: list[ScheduledRequest], warmup_steps: int = 1, growth: int = 0) -> float:
    """sum 1/K_i: the FRESH requests one step owes on average (N/K for N requests of interval K),
    each K_i the request's current interval."""
    return sum(1.0 / max(current_interval(r, warmup_steps, growth), 1) for r in requests)


def fresh_budget(
    requests: list[ScheduledRequest], credit: float | None = None, share: float | None = None, min_fresh: int = 0
) -> int:
    """FRESH requests allowed this step. Without `credit`: ceil(sum 1/K_i). With it (the share
    accrued and not yet spent, see `plan_fresh`): floor(credit), so that over steps the average is
    sum 1/K_i itself, not its ceiling; never above the ceiling, and at least `min_fresh`. With
    `min_fresh` 1 (the seed paper's rule) N <= K requests refresh one per step, a lone request
    every step; with 0 a step may have no FRESH request, and each keeps its own interval.
    `share`: sum 1/K_i when the caller has it (current intervals)."""
    ceiling = math.ceil((fresh_share(requests) if share is None else share) - 1e-9)
    if credit is None:
        return ceiling
    return max(min_fresh, min(ceiling, math.floor(credit + 1e-9)))


def plan_fresh(
    requests: list[ScheduledRequest],
    warmup_steps: int,
    credit: float | None = None,
    final_steps: int = 1,
    growth: int = 0,
    min_fresh: int = 0,
) -> tuple[list[bool], float]:
    """Forced requests are FRESH; the rest of the budget goes to the most stale, first come first.

    `credit` is the FRESH share carried from the sub-batch's previous step (None: the plain
    ceil(N/K) budget). Returns the plan and the credit to carry: this step's share is added, the
    FRESH requests are paid from it, and a debt is not carried (forced refreshes of new requests
    would otherwise starve the steps after them and bunch refreshes together)."""
    fresh = [forced_fresh(r, warmup_steps, final_steps, growth) for r in requests]
    share = fresh_share(requests, warmup_steps, growth)
    accrued = None if credit is None else credit + share
    spare = fresh_budget(requests, accrued, share, min_fresh) - sum(fresh)
    if spare > 0:
        candidates = sorted(
            (i for i, f in enumerate(fresh) if not f),
            key=lambda i: -requests[i].steps_since_fresh,
        )
        for i in candidates[:spare]:
            fresh[i] = True
    carried = 0.0 if accrued is None else max(0.0, accrued - sum(fresh))
    return fresh, carried
