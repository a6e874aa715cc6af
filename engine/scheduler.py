"""What runs at each step: admission, sub-batch choice and the FRESH/CACHED plan. Pure Python.

The scheduler never touches tensors; the runner executes the `StepPlan` it returns. Requests of
different sizes live in different sub-batches (batch key = (height, width)); each `plan()` picks
the key whose steps have cost the least device seconds, weighted by how long its jobs are
(engine/fair_share.py), so a 512² job does not wait behind 1024² steps; with `step_costs` unset
a step costs 1 (round-robin).

Admission is progressive: waiting requests join a sub-batch only at its chunk boundaries (every
`chunk` steps of that sub-batch's own step counter, `chunk` being the largest cache interval in
it), or at once when it is empty, at most `admit_per_boundary` at a time. That spreads the
requests' cache-refresh phases evenly and lets the batch grow step by step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

from engine.cache_presets import CachePreset

from engine.fair_share import FairShare, StepCharge, StepCosts
from engine.fresh_plan import forced_fresh, fresh_budget, fresh_share, plan_fresh
from engine.request import GenerationRequest
from engine.slots import SlotTable
from engine.step_plan import BatchKey, ScheduledRequest, StepPlan, make_plan

__all__ = [
    "BatchKey",
    "ScheduledRequest",
    "StepPlan",
    "Scheduler",
    "make_plan",
    "forced_fresh",
    "fresh_budget",
    "fresh_share",
    "plan_fresh",
]


@dataclass
class Scheduler:
    max_batch: int = 16  # running requests, all sub-batches together
    admit_per_boundary: int = 4
    warmup_steps: int = 1
    final_fresh_steps: int = 1  # last steps of a request that are always FRESH
    interval_growth: int = 0  # > 0: the CACHED-run bound grows from 2 to K, one every this many steps
    min_fresh_per_step: int = 0  # the fractional budget's floor (EngineConfig.min_fresh_per_step)
    # cache_interval -> the setting it asks for when a request names no policy (engine/cache_presets.py)
    presets: Mapping[int, CachePreset] = field(default_factory=dict)
    default_policy: str = "attention"  # for requests with cache_interval > 1 and no policy
    cache_budget_bytes: int = 0  # 0: unlimited
    slot_bytes_of: Callable[[BatchKey], int] = lambda key: 0  # one cache slot (one row) of a key
    clock: Callable[[], float] = time.monotonic
    fractional_budget: bool = True  # average sum 1/K FRESH per step instead of its ceiling
    extrapolation_order: int = 1  # of the CACHED steps' weights; 2 needs the runner's third history entry
    # The variable the extrapolation is a polynomial of, per step of a request (None: the step index)
    extrapolation_times: Callable[[GenerationRequest], Sequence[float]] | None = None
    waiting: deque[GenerationRequest] = field(default_factory=deque)
    running: dict[BatchKey, list[ScheduledRequest]] = field(default_factory=dict)
    key_steps: dict[BatchKey, int] = field(default_factory=dict)
    fresh_credit: dict[BatchKey, float] = field(default_factory=dict)
    step_costs: StepCosts | None = None  # None: every step costs 1 (round-robin over keys)
    share: FairShare = field(default_factory=FairShare)
    # Whether a waiting request's inputs are in (the engine's prompt embeddings, encoded ahead on a
    # thread): one that is not stays waiting while the others run.
    ready: Callable[[GenerationRequest], bool] = lambda request: True
    slots: SlotTable = field(init=False)

    def __post_init__(self) -> None:
        self.slots = SlotTable(self.slot_bytes_of)

    # -- queries -------------------------------------------------------------------------------
    def num_running(self) -> int:
        return sum(len(v) for v in self.running.values())

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running() > 0

    def running_requests(self) -> list[ScheduledRequest]:
        return [r for reqs in self.running.values() for r in reqs]

    def cache_bytes(self) -> int:
        """Attention-cache bytes of the slots in use (what admission counts)."""
        return self.slots.used_bytes()

    def cache_allocated_bytes(self) -> int:
        """Bytes of every cache pool, free slots and idle sizes included."""
        return self.slots.allocated_bytes()

    def cache_bytes_of(self, request: GenerationRequest, policy: str) -> int:
        """Attention-cache bytes `request` would hold under `policy`."""
        return self.slots.cost(request.size, self.cache_rows(request, policy))

    @staticmethod
    def cache_rows(request: GenerationRequest, policy: str) -> int:
        return (2 if request.uses_cfg else 1) if policy == "attention" else 0

    def job_seconds(self) -> dict[BatchKey, float]:
        """Estimated device seconds a job of each running size needs at that size's current batch:
        its requests' mean steps times the estimated cost of one step of all of them (every row
        FRESH, so caching policies do not change a size's rank). Empty without `step_costs`."""
        if self.step_costs is None:
            return {}
        jobs: dict[BatchKey, float] = {}
        for key, reqs in self.running.items():
            if reqs:
                step = self.step_costs.estimate(key, float(key[0] * key[1] * sum(r.rows for r in reqs)))
                jobs[key] = step * sum(r.total for r in reqs) / len(reqs)
        return jobs

    def at_boundary(self, key: BatchKey) -> bool:
        reqs = self.running.get(key)
        if not reqs:
            return True
        chunk = max(r.request.cache_interval if r.policy != "exact" else 1 for r in reqs)
        return self.key_steps.get(key, 0) % chunk == 0

    def admission_slots(self) -> int:
        """How many more requests a caller may `add` now (0 between boundaries or when full)."""
        free = self.max_batch - self.num_running() - len(self.waiting)
        if free <= 0:
            return 0
        keys_open = not self.running or any(self.at_boundary(k) for k in self.running)
        return min(free, self.admit_per_boundary) if keys_open else 0

    # -- changes -------------------------------------------------------------------------------
    def preset_of(self, request: GenerationRequest) -> CachePreset | None:
        return self.presets.get(request.cache_interval) if request.cache_policy is None else None

    def policy_of(self, request: GenerationRequest) -> str:
        if request.cache_interval <= 1:
            return "exact"
        preset = self.preset_of(request)
        return preset.policy if preset else request.cache_policy or self.default_policy

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
        reserved = 0  # cache bytes kept for earlier requests that did not fit
        for request in list(self.waiting):
            key = request.size
            if not self.at_boundary(key) or per_key.get(key, 0) >= self.admit_per_boundary:
                continue
            if not self.ready(request):
                continue
            policy = self.policy_of(request)
            cost = self.cache_bytes_of(request, policy)
            if cost and self.cache_budget_bytes and self.cache_bytes() + reserved + cost > self.cache_budget_bytes:
                # It waits until running requests free cache memory, and what they free is kept
                # for it: smaller requests behind it, which would fit, would starve it otherwise.
                # (A request needing no cache memory takes none of it and always goes in.)
                reserved += cost
                continue
            self.waiting.remove(request)
            preset = self.preset_of(request) if policy != "exact" else None
            req = ScheduledRequest(
                request,
                policy,
                1 if policy == "exact" else preset.interval if preset else request.cache_interval,
                slots=self.slots.allocate(key, self.cache_rows(request, policy)),
                admitted_at=self.clock(),
            )
            if preset:
                req.warmup_steps, req.interval_growth = preset.warmup_steps, preset.interval_growth
                req.final_fresh_steps = preset.final_fresh_steps
            if key not in self.running:
                self.running[key] = []
                self.share.join(key)
            self.running[key].append(req)
            per_key[key] = per_key.get(key, 0) + 1
            admitted.append(req)
        return admitted

    def drop_canceled(self) -> list[ScheduledRequest]:
        dropped: list[ScheduledRequest] = []
        for key in list(self.running):
            keep: list[ScheduledRequest] = []
            for req in self.running[key]:
                (dropped if req.canceled else keep).append(req)
            self.running[key] = keep
            for req in dropped:
                self._release(req)
            self._forget_if_empty(key)
        return dropped

    def _release(self, req: ScheduledRequest) -> None:
        self.slots.free(req.key, req.slots)
        req.slots = ()

    def trim(self) -> tuple[BatchKey, ...]:
        """Hand back the slots of every size no running request uses; returns those sizes."""
        return self.slots.release_idle(keep=None)

    def _forget_if_empty(self, key: BatchKey) -> None:
        if not self.running.get(key):
            self.running.pop(key, None)
            self.key_steps.pop(key, None)
            self.fresh_credit.pop(key, None)
            self.share.leave(key)

    def plan(self) -> StepPlan | None:
        """Admit at boundaries, then plan one forward of the sub-batch with the least weighted device time."""
        admitted = self._admit()
        jobs = self.job_seconds()
        key = self.share.pick(jobs)
        if key is None:
            return None
        requests = self.running[key]
        credit = self.fresh_credit.get(key, 0.0) if self.fractional_budget else None
        fresh, carried = plan_fresh(
            requests, self.warmup_steps, credit, self.final_fresh_steps, self.interval_growth, self.min_fresh_per_step
        )
        if self.fractional_budget:
            self.fresh_credit[key] = carried
        if not requests:
            return None
        plan = make_plan(
            key,
            requests,
            fresh,
            self.slots,
            tuple(r for r in admitted if r.key == key),
            self.extrapolation_order,
            self.extrapolation_times,
        )
        work = float(key[0] * key[1] * sum(r.rows for r, f in zip(requests, fresh) if f or r.policy != "step"))
        if self.step_costs is None:
            return replace(plan, charge=StepCharge(key, work, 1.0))
        weight = self.share.weights(jobs)[key]
        return replace(plan, charge=StepCharge(key, work, self.step_costs.estimate(key, work), weight))

    def complete(self, plan: StepPlan) -> list[ScheduledRequest]:
        """Record that `plan` ran; return the requests that have finished."""
        finished = []
        for req, was_fresh in zip(plan.requests, plan.fresh):
            req.record_step(was_fresh)
            if req.done:
                finished.append(req)
                self._release(req)
        self.key_steps[plan.key] = self.key_steps.get(plan.key, 0) + 1
        if self.step_costs is not None and plan.charge is not None:
            self.share.hold(plan.key, plan.charge.cost, plan.charge.weight)  # until `observe` brings its seconds
        else:
            self.share.charge(plan.key, 1.0)
        if finished:
            self.running[plan.key] = [r for r in self.running[plan.key] if not r.done]
            self._forget_if_empty(plan.key)
        return finished

    def observe(self, charge: StepCharge, seconds: float) -> None:
        """A step's measured device seconds: learn its key's rate, replace the estimate it held."""
        if self.step_costs is None:
            raise ValueError("this scheduler counts steps (step_costs=None); it takes no measured seconds")
        self.step_costs.observe(charge.key, charge.work, seconds)
        self.share.settle(charge.key, charge.cost, seconds, charge.weight)
