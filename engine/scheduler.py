"""What runs at each step: admission, sub-batch choice and the FRESH/CACHED plan. Pure Python.

The scheduler never touches tensors; the runner executes the `StepPlan` it returns. Requests of
different sizes live in different sub-batches (batch key = (height, width)); each `plan()` picks
one key, round-robin over the keys that have work, so every size progresses fairly.

Admission is progressive: waiting requests join a sub-batch only at its chunk boundaries (every
`chunk` steps of that sub-batch's own step counter, `chunk` being the largest cache interval in
it), or at once when it is empty, at most `admit_per_boundary` at a time. That spreads the
requests' cache-refresh phases evenly and lets the batch grow step by step.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from engine.request import GenerationRequest

BatchKey = tuple[int, int]


@dataclass
class ScheduledRequest:
    """A running request's progress as the scheduler sees it."""

    request: GenerationRequest
    policy: str  # "exact", "attention" or "step"
    interval: int  # K: at most K-1 consecutive CACHED steps
    step: int = 0  # denoising steps done
    steps_since_fresh: int = 0  # consecutive CACHED steps just before now
    fresh_steps: int = 0
    canceled: bool = False

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


@dataclass(frozen=True)
class StepPlan:
    """One forward: the sub-batch `key`, its requests in row order, and which compute attention."""

    key: BatchKey
    requests: tuple[ScheduledRequest, ...]
    fresh: tuple[bool, ...]
    admitted: tuple[ScheduledRequest, ...]

    @property
    def fresh_ratio(self) -> float:
        return sum(self.fresh) / len(self.fresh) if self.fresh else 0.0


def forced_fresh(req: ScheduledRequest, warmup_steps: int) -> bool:
    """Steps where a request must compute attention whatever the budget."""
    return (
        req.policy == "exact"
        or req.interval <= 1
        or req.step < max(warmup_steps, 1)  # new requests and the warm-up
        or req.step == req.total - 1  # the last step
        or req.steps_since_fresh >= req.interval - 1  # staleness bound
    )


def fresh_share(requests: list[ScheduledRequest]) -> float:
    """sum 1/K_i: the FRESH requests one step owes on average (N/K for N requests of interval K)."""
    return sum(1.0 / max(r.interval, 1) for r in requests)


def fresh_budget(requests: list[ScheduledRequest], credit: float | None = None) -> int:
    """FRESH requests allowed this step. Without `credit`: ceil(sum 1/K_i). With it (the share
    accrued and not yet spent, see `plan_fresh`): floor(credit), so that over steps the average is
    sum 1/K_i itself, not its ceiling; never above the ceiling, and at least one."""
    ceiling = math.ceil(fresh_share(requests) - 1e-9)
    if credit is None:
        return ceiling
    return max(1, min(ceiling, math.floor(credit + 1e-9)))


def plan_fresh(requests: list[ScheduledRequest], warmup_steps: int,
               credit: float | None = None) -> tuple[list[bool], float]:
    """Forced requests are FRESH; the rest of the budget goes to the most stale, first come first.

    `credit` is the FRESH share carried from the sub-batch's previous step (None: the plain
    ceil(N/K) budget). Returns the plan and the credit to carry: this step's share is added, the
    FRESH requests are paid from it, and a debt is not carried (forced refreshes of new requests
    would otherwise starve the steps after them and bunch refreshes together)."""
    fresh = [forced_fresh(r, warmup_steps) for r in requests]
    accrued = None if credit is None else credit + fresh_share(requests)
    spare = fresh_budget(requests, accrued) - sum(fresh)
    if spare > 0:
        candidates = sorted(
            (i for i, f in enumerate(fresh) if not f),
            key=lambda i: -requests[i].steps_since_fresh,
        )
        for i in candidates[:spare]:
            fresh[i] = True
    carried = 0.0 if accrued is None else max(0.0, accrued - sum(fresh))
    return fresh, carried


@dataclass
class Scheduler:
    max_batch: int = 16  # running requests, all sub-batches together
    admit_per_boundary: int = 4
    warmup_steps: int = 1
    default_policy: str = "attention"  # for requests with cache_interval > 1 and no policy
    cache_budget_bytes: int = 0  # 0: unlimited
    cache_bytes_of: Callable[[GenerationRequest, str], int] = lambda request, policy: 0
    fractional_budget: bool = True  # average sum 1/K FRESH per step instead of its ceiling
    waiting: deque[GenerationRequest] = field(default_factory=deque)
    running: dict[BatchKey, list[ScheduledRequest]] = field(default_factory=dict)
    key_steps: dict[BatchKey, int] = field(default_factory=dict)
    fresh_credit: dict[BatchKey, float] = field(default_factory=dict)
    _key_order: deque[BatchKey] = field(default_factory=deque)

    # -- queries -------------------------------------------------------------------------------
    def num_running(self) -> int:
        return sum(len(v) for v in self.running.values())

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running() > 0

    def running_requests(self) -> list[ScheduledRequest]:
        return [r for reqs in self.running.values() for r in reqs]

    def cache_bytes(self) -> int:
        return sum(self.cache_bytes_of(r.request, r.policy) for r in self.running_requests())

    def at_boundary(self, key: BatchKey) -> bool:
        reqs = self.running.get(key)
        if not reqs:
            return True
        chunk = max(r.interval for r in reqs)
        return self.key_steps.get(key, 0) % chunk == 0

    def admission_slots(self) -> int:
        """How many more requests a caller may `add` now (0 between boundaries or when full)."""
        free = self.max_batch - self.num_running() - len(self.waiting)
        if free <= 0:
            return 0
        keys_open = not self.running or any(self.at_boundary(k) for k in self.running)
        return min(free, self.admit_per_boundary) if keys_open else 0

    # -- changes -------------------------------------------------------------------------------
    def policy_of(self, request: GenerationRequest) -> str:
        if request.cache_interval <= 1:
            return "exact"
        return request.cache_policy or self.default_policy

    def add(self, request: GenerationRequest) -> None:
        if self.cache_budget_bytes and self.cache_bytes_of(request, self.policy_of(request)) > self.cache_budget_bytes:
            raise ValueError(
                f"request {request.request_id} needs more attention-cache memory than the budget "
                f"({self.cache_budget_bytes} bytes); use a smaller size or cache_interval=1"
            )
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                return True
        for req in self.running_requests():
            if req.request_id == request_id:
                req.canceled = True
                return True
        return False

    def _admit(self) -> list[ScheduledRequest]:
        admitted: list[ScheduledRequest] = []
        per_key: dict[BatchKey, int] = {}
        for request in list(self.waiting):
            key = request.size
            if not self.at_boundary(key) or per_key.get(key, 0) >= self.admit_per_boundary:
                continue
            policy = self.policy_of(request)
            cost = self.cache_bytes_of(request, policy)
            if self.cache_budget_bytes and self.cache_bytes() + cost > self.cache_budget_bytes:
                continue  # stays waiting until running requests free cache memory
            self.waiting.remove(request)
            req = ScheduledRequest(request, policy, 1 if policy == "exact" else request.cache_interval)
            if key not in self.running:
                self.running[key] = []
                self._key_order.append(key)
            self.running[key].append(req)
            per_key[key] = per_key.get(key, 0) + 1
            admitted.append(req)
        return admitted

    def drop_canceled(self) -> list[ScheduledRequest]:
        dropped = []
        for key in list(self.running):
            keep = []
            for req in self.running[key]:
                (dropped if req.canceled else keep).append(req)
            self.running[key] = keep
            self._forget_if_empty(key)
        return dropped

    def _forget_if_empty(self, key: BatchKey) -> None:
        if not self.running.get(key):
            self.running.pop(key, None)
            self.key_steps.pop(key, None)
            self.fresh_credit.pop(key, None)
            if key in self._key_order:
                self._key_order.remove(key)

    def plan(self) -> StepPlan | None:
        """Admit at boundaries, then plan one forward of the next sub-batch in turn."""
        admitted = self._admit()
        if not self._key_order:
            return None
        key = self._key_order[0]
        self._key_order.rotate(-1)
        requests = self.running[key]
        credit = self.fresh_credit.get(key, 0.0) if self.fractional_budget else None
        fresh, carried = plan_fresh(requests, self.warmup_steps, credit)
        if self.fractional_budget:
            self.fresh_credit[key] = carried
        return StepPlan(
            key=key,
            requests=tuple(requests),
            fresh=tuple(fresh),
            admitted=tuple(r for r in admitted if r.key == key),
        ) if requests else None

    def complete(self, plan: StepPlan) -> list[ScheduledRequest]:
        """Record that `plan` ran; return the requests that have finished."""
        finished = []
        for req, was_fresh in zip(plan.requests, plan.fresh):
            req.step += 1
            if was_fresh:
                req.fresh_steps += 1
                req.steps_since_fresh = 0
            else:
                req.steps_since_fresh += 1
            if req.done:
                finished.append(req)
        self.key_steps[plan.key] = self.key_steps.get(plan.key, 0) + 1
        if finished:
            self.running[plan.key] = [r for r in self.running[plan.key] if not r.done]
            self._forget_if_empty(plan.key)
        return finished
