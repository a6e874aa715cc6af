"""Which sub-batch runs next: fair in device time, not in steps. Pure Python.

Each batch key (image size) keeps a virtual time, the device seconds its steps have cost; the
next step goes to the key with the least virtual time among the keys with work (ties: the key
that joined first). A step counts at its estimated cost when it completes (`StepCosts`: learned
seconds per unit of work, the work being pixels x transformer rows) until the caller reports
its measured cost, which on a GPU comes a few steps later, and then counts at that. A key
that joins starts at the current least virtual time, so it neither monopolises the device to
"catch up" nor waits behind the others' history. A step counts for at most `max_charge`
seconds, so one slow step (a compile, say) costs its key no long wait afterwards. Between two
steps of a key, each other key runs for at most `max_charge` plus one of its own steps (plus
the steps not measured yet when measurements come late).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

BatchKey = tuple[int, int]

__all__ = ["BatchKey", "FairShare", "StepCharge", "StepCosts"]


@dataclass(frozen=True)
class StepCharge:
    """What one step was charged: its key, its work (pixels x rows) and its estimated seconds."""

    key: BatchKey
    work: float
    cost: float


@dataclass
class StepCosts:
    """Estimated device seconds of a step from its work, learned per key from measured steps
    (an exponential moving average of seconds per unit of work). A key not measured yet takes
    the mean rate of the measured keys, or `prior_rate` before any measurement."""

    prior_rate: float = 1.5e-8  # s per pixel-row: SD3-medium on an H200 (0.38 s for 1024² x 20 rows)
    smoothing: float = 0.3  # weight of the newest measurement
    rates: dict[BatchKey, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prior_rate <= 0 or not 0 < self.smoothing <= 1:
            raise ValueError("prior_rate must be > 0 and smoothing in (0, 1]")

    def rate(self, key: BatchKey) -> float:
        if key in self.rates:
            return self.rates[key]
        return sum(self.rates.values()) / len(self.rates) if self.rates else self.prior_rate

    def estimate(self, key: BatchKey, work: float) -> float:
        return self.rate(key) * work

    def observe(self, key: BatchKey, work: float, seconds: float) -> None:
        """A step of `work` took `seconds`; a step with no transformer work teaches nothing."""
        if work < 0 or seconds < 0:
            raise ValueError(f"a measured step needs work >= 0 and seconds >= 0, got {work} and {seconds}")
        if work == 0:
            return
        measured = seconds / work
        old = self.rates.get(key)
        self.rates[key] = measured if old is None else old + self.smoothing * (measured - old)

    def reset(self) -> None:
        """Forget every measurement (e.g. the compiling steps of a warm-up)."""
        self.rates.clear()


@dataclass
class FairShare:
    """Virtual device time per batch key with work: settled seconds plus estimates on hold."""

    max_charge: float = 5.0  # seconds one step may count for at most (a compiling step takes more)
    settled: dict[BatchKey, float] = field(default_factory=dict)
    held: dict[BatchKey, float] = field(default_factory=dict)  # estimates not measured yet
    _joined: dict[BatchKey, int] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.max_charge <= 0:
            raise ValueError("max_charge must be > 0")

    def vtime(self, key: BatchKey) -> float:
        return self.settled[key] + self.held[key]

    def join(self, key: BatchKey) -> None:
        """`key` has work; a new key starts at the least virtual time of the others."""
        if key not in self.settled:
            self.settled[key] = min((self.vtime(k) for k in self.settled), default=0.0)
            self.held[key] = 0.0
            self._joined[key] = next(self._counter)

    def leave(self, key: BatchKey) -> None:
        for table in (self.settled, self.held, self._joined):
            table.pop(key, None)

    def pick(self) -> BatchKey | None:
        """The key that runs next: least virtual time, then the earliest joined."""
        if not self.settled:
            return None
        return min(self.settled, key=lambda k: (self.vtime(k), self._joined[k]))

    def charge(self, key: BatchKey, seconds: float) -> None:
        """A step of `key` cost `seconds`. A key that left is not charged."""
        if key in self.settled:
            self.settled[key] += min(seconds, self.max_charge)

    def hold(self, key: BatchKey, estimate: float) -> None:
        """A step of `key` ran; count its estimate until `settle` replaces it by its measure."""
        if key in self.held:
            self.held[key] += min(estimate, self.max_charge)

    def settle(self, key: BatchKey, estimate: float, seconds: float) -> None:
        """The step held at `estimate` was measured at `seconds`."""
        if key in self.held:
            self.held[key] -= min(estimate, self.max_charge)
            self.charge(key, seconds)
