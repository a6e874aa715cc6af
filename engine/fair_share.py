"""Which sub-batch runs next: fair in device time weighted by job length, not in steps. Pure Python.

Each batch key (image size) keeps a virtual time, the device seconds its steps have cost, each
multiplied by the key's weight; the next step goes to the key with the least virtual time among
the keys with work (ties: the key with the shorter jobs, then the key that joined first). The
weight of a key is how many times longer its jobs are than the shortest jobs running (device
seconds a job of it needs at the current batch, `Scheduler.job_seconds`), capped at `max_ratio`:
two sizes whose jobs take 0.4 s and 1.6 s share the device 4:1 while both have work, so every
job is stretched by about the same factor and a short job does not wait behind a long one's
steps (equal shares stretched 512² jobs ~2x in a mixed SD3 workload, see
tests/test_fair_share_mixed.py). `max_ratio=1` is equal shares of device time.

A step counts at its estimated cost when it completes (`StepCosts`: learned seconds per unit of
work, the work being pixels x transformer rows) until the caller reports its measured cost,
which on a GPU comes a few steps later, and then counts at that.

A key that joins starts at the least virtual time the others had before their newest step, the
one the device is already running or about to (start-time fair queueing). So it neither
monopolises the device to "catch up" nor waits behind the others' history, and it does not wait
behind one of their steps twice, once on the device and once more in the share (a 512² job
joining a 1024² batch of 8 lost 0.3 s that way in tests/mixed_size_sim.py).

A step counts for at most `max_charge` seconds (times its weight), so one slow step (a compile,
say) costs its key no long wait afterwards. Between two steps of a key, each other key runs for
at most `max_ratio * max(max_charge, its step)` plus one of its own steps (plus the steps not
measured yet when measurements come late, and once more for a key that has just joined): no
size starves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping

BatchKey = tuple[int, int]

__all__ = ["BatchKey", "FairShare", "StepCharge", "StepCosts"]


@dataclass(frozen=True)
class StepCharge:
    """What one step was charged: its key, its work (pixels x rows), its estimated seconds and
    its key's weight (`FairShare.weights`)."""

    key: BatchKey
    work: float
    cost: float
    weight: float = 1.0  # the key's weight when it ran: the seconds count this many times


@dataclass
class StepCosts:
    """Estimated device seconds of a step from its work, learned per key from measured steps
    (an exponential moving average of seconds per unit of work). A key not measured yet takes
    the mean rate of the measured keys, or `prior_rate` before any measurement. A step of a work
    already measured at that key takes the moving average of those steps instead: a step has a
    fixed cost besides its work (a 512² step of 1 request costs more per row than one of 8), so
    the rate alone is off by up to half at the ends of the batch range, and a batch that runs
    step after step repeats its seconds closely (engine/step_timer.py plans by them)."""

    prior_rate: float = 1.5e-8  # s per pixel-row: SD3-medium on an H200 (0.38 s for 1024² x 20 rows)
    smoothing: float = 0.3  # weight of the newest measurement
    rates: dict[BatchKey, float] = field(default_factory=dict)
    recent: dict[tuple[BatchKey, float], float] = field(default_factory=dict)  # seconds by (key, work)
    max_recent: int = 256  # (key, work) pairs kept, the least recently measured dropped first

    def __post_init__(self) -> None:
        if self.prior_rate <= 0 or not 0 < self.smoothing <= 1:
            raise ValueError("prior_rate must be > 0 and smoothing in (0, 1]")

    def rate(self, key: BatchKey) -> float:
        if key in self.rates:
            return self.rates[key]
        return sum(self.rates.values()) / len(self.rates) if self.rates else self.prior_rate

    def estimate(self, key: BatchKey, work: float) -> float:
        seen = self.recent.get((key, work))
        return seen if seen is not None else self.rate(key) * work

    def observe(self, key: BatchKey, work: float, seconds: float) -> None:
        """A step of `work` took `seconds`; a step with no transformer work teaches nothing."""
        if work < 0 or seconds < 0:
            raise ValueError(f"a measured step needs work >= 0 and seconds >= 0, got {work} and {seconds}")
        if work == 0:
            return
        measured = seconds / work
        old = self.rates.get(key)
        self.rates[key] = measured if old is None else old + self.smoothing * (measured - old)
        before = self.recent.pop((key, work), None)
        self.recent[(key, work)] = seconds if before is None else before + self.smoothing * (seconds - before)
        while len(self.recent) > self.max_recent:
            self.recent.pop(next(iter(self.recent)))

    def reset(self) -> None:
        """Forget every measurement (e.g. the compiling steps of a warm-up)."""
        self.rates.clear()
        self.recent.clear()


@dataclass
class FairShare:
    """Virtual device time per batch key with work: settled seconds plus estimates on hold."""

    max_charge: float = 5.0  # seconds one step may count for at most (a compiling step takes more)
    max_ratio: float = 8.0  # the largest weight: how far a key with long jobs yields to short ones
    settled: dict[BatchKey, float] = field(default_factory=dict)
    held: dict[BatchKey, float] = field(default_factory=dict)  # estimates not measured yet
    newest: dict[BatchKey, float] = field(default_factory=dict)  # what the key's newest step added
    _joined: dict[BatchKey, int] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.max_charge <= 0:
            raise ValueError("max_charge must be > 0")
        if not self.max_ratio >= 1:
            raise ValueError(f"max_ratio must be >= 1 (1: equal shares of device time), got {self.max_ratio}")

    def vtime(self, key: BatchKey) -> float:
        return self.settled[key] + self.held[key]

    def join(self, key: BatchKey) -> None:
        """`key` has work; a new key starts at the least virtual time the others had before their
        newest step (that step is on the device already: the joiner does not wait behind it twice)."""
        if key not in self.settled:
            self.settled[key] = min((self.vtime(k) - self.newest.get(k, 0.0) for k in self.settled), default=0.0)
            self.held[key] = 0.0
            self._joined[key] = next(self._counter)

    def leave(self, key: BatchKey) -> None:
        for table in (self.settled, self.held, self.newest, self._joined):
            table.pop(key, None)

    def pick(self, job_seconds: Mapping[BatchKey, float] | None = None) -> BatchKey | None:
        """The key that runs next: least virtual time, then the shorter jobs, then the earliest joined."""
        if not self.settled:
            return None
        jobs = job_seconds or {}
        return min(self.settled, key=lambda k: (self.vtime(k), jobs.get(k, 0.0), self._joined[k]))

    def weights(self, job_seconds: Mapping[BatchKey, float]) -> dict[BatchKey, float]:
        """Each key's weight: its jobs' device seconds over the shortest jobs', in [1, max_ratio]."""
        if any(not seconds >= 0 for seconds in job_seconds.values()):
            raise ValueError(f"job seconds must be >= 0, got {dict(job_seconds)}")
        shortest = min(job_seconds.values(), default=0.0)

        def weight(seconds: float) -> float:
            if seconds <= shortest:
                return 1.0
            return self.max_ratio if shortest == 0 else min(seconds / shortest, self.max_ratio)

        return {k: weight(seconds) for k, seconds in job_seconds.items()}

    def counted(self, seconds: float, weight: float) -> float:
        """The virtual time a step of `seconds` adds at `weight`."""
        return min(seconds, self.max_charge) * weight

    def charge(self, key: BatchKey, seconds: float, weight: float = 1.0) -> None:
        """A step of `key` cost `seconds`. A key that left is not charged."""
        if key in self.settled:
            self.newest[key] = self.counted(seconds, weight)
            self.settled[key] += self.newest[key]

    def hold(self, key: BatchKey, estimate: float, weight: float = 1.0) -> None:
        """A step of `key` ran; count its estimate until `settle` replaces it by its measure."""
        if key in self.held:
            self.newest[key] = self.counted(estimate, weight)
            self.held[key] += self.newest[key]

    def settle(self, key: BatchKey, estimate: float, seconds: float, weight: float = 1.0) -> None:
        """The step held at `estimate` (at `weight`) was measured at `seconds`."""
        if key in self.held:
            self.held[key] -= self.counted(estimate, weight)
            self.settled[key] += self.counted(seconds, weight)
