"""Device seconds of each engine step, read without waiting for the device.

On CUDA the host queues a step's kernels and returns long before they run, so the host's clock
around `Runner.run` says little about which step the device spent its time on. A pair of CUDA
events around each step measures the step itself; `done()` hands back the steps the device has
passed, a few steps late, and never blocks. On the CPU the work is done when `run` returns, so
the host's clock is the measure.

Left alone, the host runs ahead of the device by as many steps as CUDA's launch queue holds
(more when steps replay CUDA graphs): a new request would then wait behind steps already queued,
and the scheduler would share the device between sizes by decisions made that far ahead.
`wait_for_room()` bounds it. The engine calls it after launching each step: with `max_in_flight` 2
it returns once step n-1 has finished, so the worker's admissions and the plan of step n+1 happen
while step n keeps the device busy.

A long step n (a 1024² batch of 8 takes ~0.3 s on an H200) still makes step n+1 a decision taken
a whole step early: a 512² job that arrives meanwhile waits for the rest of n and all of n+1.
With `plan_lead` > 0 the host, having seen step n-1 end (so n has just begun), waits further until
`plan_lead` seconds before n's expected end (its estimated cost, passed to `stop`), or until n
ends if that comes first, and plans then: just in time, with the newest arrivals seen.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

Tag = TypeVar("Tag")
POLL_SECONDS = 0.001  # how often a just-in-time wait looks whether the running step ended early


@dataclass
class _Pending(Generic[Tag]):
    tag: Tag
    start: torch.cuda.Event
    end: torch.cuda.Event
    expected: float = 0.0  # estimated device seconds of the step (0: unknown)


class StepTimer(Generic[Tag]):
    """`start()` before a step, `stop(tag)` after it, `done()` for (tag, seconds) of the steps the
    device has finished. At most `max_pending` steps wait to be read; older ones are dropped
    unmeasured (a device that far behind has more pressing trouble than fairness)."""

    def __init__(self, device: torch.device, max_pending: int = 64, max_in_flight: int = 0, plan_lead: float = 0.0) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0 (0: no bound)")
        if not 0 <= plan_lead < 60:  # also refuses nan and inf
            raise ValueError(f"plan_lead must be >= 0 and < 60 s (0: plan as soon as there is room), got {plan_lead!r}")
        self.cuda = device.type == "cuda"
        self.max_pending = max_pending
        self.max_in_flight = max_in_flight
        self.plan_lead = plan_lead
        self._pending: deque[_Pending[Tag]] = deque()
        self._measured: list[tuple[Tag, float]] = []
        self._start_event: torch.cuda.Event | None = None
        self._start_time = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._start_time = time.perf_counter()

    def stop(self, tag: Tag, expected: float = 0.0) -> None:
        """The step begun by the last `start()` has been queued (CUDA) or run (CPU); `expected`:
        its estimated device seconds, for `plan_lead`."""
        if not self.cuda:
            self._measured.append((tag, time.perf_counter() - self._start_time))
            return
        if self._start_event is None:
            raise RuntimeError("StepTimer.stop without start")
        # blocking: `wait_for_room` sleeps on it rather than spinning a core the upload threads use
        end = torch.cuda.Event(enable_timing=True, blocking=True)
        end.record()
        self._pending.append(_Pending(tag, self._start_event, end, expected))
        self._start_event = None
        while len(self._pending) > self.max_pending:
            self._pending.popleft()

    def wait_for_room(self) -> None:
        """Block until fewer than `max_in_flight` timed steps are still running on the device (no
        wait on the CPU, or with no bound). The steps that finished are read as by `done()`."""
        if not self.max_in_flight:
            return
        self._read_finished()
        waited = False
        while len(self._pending) >= self.max_in_flight:
            self._pending[0].end.synchronize()
            waited = True
            self._read_finished()
        if self.plan_lead and waited and len(self._pending) == 1:
            self._wait_until_near_end(self._pending[0])

    def _wait_until_near_end(self, step: _Pending[Tag]) -> None:
        """`step` began just now (the step before it ended as the host watched): sleep until
        `plan_lead` before its expected end, polling its end event so an early end cuts it short."""
        deadline = time.perf_counter() + step.expected - self.plan_lead
        while not step.end.query():
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            time.sleep(min(left, POLL_SECONDS))
        self._read_finished()

    def in_flight(self) -> int:
        """Timed steps queued on the device and not finished yet (0 on the CPU)."""
        self._read_finished()
        return len(self._pending)

    def _read_finished(self) -> None:
        while self._pending and self._pending[0].end.query():
            step = self._pending.popleft()
            self._measured.append((step.tag, step.start.elapsed_time(step.end) / 1000.0))

    def done(self) -> list[tuple[Tag, float]]:
        """The measured steps since the last call, oldest first."""
        self._read_finished()
        measured, self._measured = self._measured, []
        return measured
