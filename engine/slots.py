"""Attention-cache slots, handed out by the scheduler. Pure Python: no tensors.

Each image size (batch key) has its own pools (engine/slot_pool.py); a slot is one row of them.
A request of the `attention` policy takes one slot per CFG row when it is admitted and gives
them back when it finishes or is canceled. A key's capacity is the most slots it held at once
since its pools were created: the pools must have at least that many rows. A key whose slots
are all free keeps its capacity (and its pools, with the CUDA graphs captured on them) until
`release_idle` hands it back, after which its pools are rebuilt from nothing.

Memory is slots × bytes per slot (`slot_bytes_of(key)`): the one figure admission budgets and
the worker's metrics report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

Key = TypeVar("Key", bound=Hashable)  # the scheduler's batch key, (height, width)


@dataclass
class SlotTable(Generic[Key]):
    slot_bytes_of: Callable[[Key], int] = lambda key: 0
    _used: dict[Key, set[int]] = field(default_factory=dict)
    _capacity: dict[Key, int] = field(default_factory=dict)

    def allocate(self, key: Key, count: int) -> tuple[int, ...]:
        """`count` free slots of `key`, lowest first."""
        used = self._used.setdefault(key, set())
        slots: list[int] = []
        candidate = 0
        while len(slots) < count:
            if candidate not in used:
                slots.append(candidate)
                used.add(candidate)
            candidate += 1
        if slots:
            self._capacity[key] = max(self._capacity.get(key, 0), slots[-1] + 1)
        return tuple(slots)

    def free(self, key: Key, slots: tuple[int, ...]) -> None:
        used = self._used.get(key, set())
        for slot in slots:
            used.discard(slot)

    def in_use(self, key: Key) -> int:
        return len(self._used.get(key, ()))

    def capacity(self, key: Key) -> int:
        """Rows every pool of `key` must have (0: it has no pools)."""
        return self._capacity.get(key, 0)

    def release_idle(self, keep: Key | None = None) -> tuple[Key, ...]:
        """Forget every key (but `keep`) with no slot in use; returns them, so their pools go."""
        idle = tuple(k for k in self._capacity if k != keep and not self._used.get(k))
        for key in idle:
            del self._capacity[key]
            self._used.pop(key, None)
        return idle

    def cost(self, key: Key, count: int) -> int:
        """Bytes `count` more slots of `key` would hold."""
        return count * self.slot_bytes_of(key) if count else 0

    def used_bytes(self) -> int:
        """Bytes of the slots in use: what the admission budget counts."""
        return sum(self.cost(key, len(used)) for key, used in self._used.items())

    def allocated_bytes(self) -> int:
        """Bytes of every pool row, free slots and idle keys included."""
        return sum(self.cost(key, capacity) for key, capacity in self._capacity.items())


def extrapolation_weight(step: int, refreshes: tuple[int, ...]) -> float:
    """First-order extrapolation weight of a CACHED step from the last two FRESH steps, in step
    units: the cached quantity is a1 + (a1 - a0) * w. 0.0 (a hold) with fewer than two."""
    if len(refreshes) < 2 or refreshes[-1] == refreshes[-2]:
        return 0.0
    return (step - refreshes[-1]) / (refreshes[-1] - refreshes[-2])


def extrapolation_weights(
    step: int, refreshes: tuple[int, ...], order: int, times: Sequence[float] | None = None
) -> tuple[float, float]:
    """Weights (w1, w2) of a CACHED step's polynomial extrapolation of order `order` (at most 2)
    through the last `order + 1` FRESH steps: the cached quantity is
    a2 + (a2 - a1) * w1 + (a2 - a0) * w2, with a2 the newest refresh (w = minus the Lagrange
    coefficients of the older points). The polynomial's variable is the step index, or
    `times[step]` (e.g. the request's sigma schedule) when given. With too few distinct refreshes
    the order drops."""
    if order < 1 or len(refreshes) < 2 or refreshes[-1] == refreshes[-2]:
        return 0.0, 0.0

    def at(k: int) -> float:
        return float(k) if times is None else float(times[k])

    t = at(step)
    if order < 2 or len(refreshes) < 3 or len(set(refreshes[-3:])) < 3:
        t1, t2 = at(refreshes[-2]), at(refreshes[-1])
        return (t - t2) / (t2 - t1), 0.0
    t0, t1, t2 = (at(k) for k in refreshes[-3:])
    lagrange_1 = (t - t0) * (t - t2) / ((t1 - t0) * (t1 - t2))
    lagrange_0 = (t - t1) * (t - t2) / ((t0 - t1) * (t0 - t2))
    return -lagrange_1, -lagrange_0
