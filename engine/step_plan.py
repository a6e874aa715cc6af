"""A running request as the scheduler sees it (`ScheduledRequest`) and one forward's plan
(`StepPlan`, built by `make_plan`): the typed seam between the pure scheduler and the runner. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from engine.fair_share import StepCharge
from engine.request import GenerationRequest
from engine.slots import SlotTable, extrapolation_weights

BatchKey = tuple[int, int]


@dataclass
class ScheduledRequest:
    """A running request's progress as the scheduler sees it: the one owner of its step count,
    its attention-cache slots and when it was last FRESH."""

    request: GenerationRequest
    policy: str  # "exact", "attention" or "step"
    interval: int  # K: at most K-1 consecutive CACHED steps
    step: int = 0  # denoising steps done
    fresh_steps: int = 0
    canceled: bool = False
    slots: tuple[int, ...] = ()  # attention-cache slot of each CFG row (the `attention` policy)
    refreshes: tuple[int, ...] = ()  # the steps of its last three FRESH steps, oldest first
    admitted_at: float = 0.0  # scheduler clock (time.monotonic) at admission
    # The request's own FRESH schedule (engine/cache_presets.py); None: the scheduler's
    warmup_steps: int | None = None
    final_fresh_steps: int | None = None
    interval_growth: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> BatchKey:
        return self.request.size

    @property
    def total(self) -> int:
        return self.request.steps

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def rows(self) -> int:
        """Rows of the transformer batch: uncond and cond with CFG, else one."""
        return 2 if self.request.uses_cfg else 1

    @property
    def steps_since_fresh(self) -> int:
        """Consecutive CACHED steps just before now."""
        return self.step - self.refreshes[-1] - 1 if self.refreshes else self.step

    def record_step(self, fresh: bool) -> None:
        """This request ran one step, FRESH or CACHED."""
        if fresh:
            self.fresh_steps += 1
            self.refreshes = self.refreshes[-2:] + (self.step,)
        self.step += 1


@dataclass(frozen=True)
class StepPlan:
    """One forward: the sub-batch `key`, its requests in row order, which compute attention, and
    for the attention cache each request's slots (one per CFG row; none without a cache), each
    CACHED request's extrapolation weights (`weights` of the refresh before the last, 0.0: a hold;
    `older_weights` of the one before that, 0.0 below second order), the rows its pools need
    (`capacity`) and the idle keys whose pools go now (`free_pools`)."""

    key: BatchKey
    requests: tuple[ScheduledRequest, ...]
    fresh: tuple[bool, ...]
    admitted: tuple[ScheduledRequest, ...]
    weights: tuple[float, ...] = ()
    older_weights: tuple[float, ...] = ()
    slots: tuple[tuple[int, ...], ...] = ()
    capacity: int = 0
    free_pools: tuple[BatchKey, ...] = ()
    charge: StepCharge | None = None  # what the scheduler charges this step (fair_share.py)

    @property
    def fresh_ratio(self) -> float:
        return sum(self.fresh) / len(self.fresh) if self.fresh else 0.0

    def computes_attention(self, i: int) -> bool:
        """Whether request `i` computes attention this step (its rows are FRESH for the attention
        cache): a FRESH step, or a policy that does not cache attention."""
        return self.fresh[i] or self.requests[i].policy != "attention"

    def caches(self, i: int) -> bool:
        """Whether request `i` keeps an attention cache."""
        return self.requests[i].policy == "attention"


def make_plan(
    key: BatchKey,
    requests: list[ScheduledRequest] | tuple[ScheduledRequest, ...],
    fresh: list[bool] | tuple[bool, ...],
    slots: SlotTable,
    admitted: tuple[ScheduledRequest, ...] = (),
    order: int = 1,
    times_of: Callable[[GenerationRequest], Sequence[float]] | None = None,
) -> StepPlan:
    """The plan of one forward of `key` with this FRESH/CACHED choice and extrapolation `order`
    (engine/slots.py `extrapolation_weights`, in the units of `times_of(request)`, else steps);
    hands back other idle keys' slots (their pools go before this step runs)."""
    pairs = [
        (0.0, 0.0) if f else extrapolation_weights(r.step, r.refreshes, order, None if times_of is None else times_of(r.request))
        for r, f in zip(requests, fresh)
    ]
    weights = tuple(w for w, _ in pairs)
    older = tuple(w for _, w in pairs)
    return StepPlan(
        key=key,
        requests=tuple(requests),
        fresh=tuple(fresh),
        admitted=admitted,
        weights=weights,
        older_weights=older,
        slots=tuple(r.slots for r in requests),
        capacity=slots.capacity(key),
        free_pools=slots.release_idle(keep=key),
    )
