"""Device seconds of each engine step, read without waiting for the device.

On CUDA the host queues a step's kernels and returns long before they run, so the host's clock
around `Runner.run` says little about which step the device spent its time on. A pair of CUDA
events around each step measures the step itself; `done()` hands back the steps the device has
passed, a few steps late, and never blocks. On the CPU the work is done when `run` returns, so
the host's clock is the measure.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

Tag = TypeVar("Tag")


@dataclass
class _Pending(Generic[Tag]):
    tag: Tag
    start: torch.cuda.Event
    end: torch.cuda.Event


class StepTimer(Generic[Tag]):
    """`start()` before a step, `stop(tag)` after it, `done()` for (tag, seconds) of the steps the
    device has finished. At most `max_pending` steps wait to be read; older ones are dropped
    unmeasured (a device that far behind has more pressing trouble than fairness)."""

    def __init__(self, device: torch.device, max_pending: int = 64) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.cuda = device.type == "cuda"
        self.max_pending = max_pending
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

    def stop(self, tag: Tag) -> None:
        """The step begun by the last `start()` has been queued (CUDA) or run (CPU)."""
        if not self.cuda:
            self._measured.append((tag, time.perf_counter() - self._start_time))
            return
        if self._start_event is None:
            raise RuntimeError("StepTimer.stop without start")
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append(_Pending(tag, self._start_event, end))
        self._start_event = None
        while len(self._pending) > self.max_pending:
            self._pending.popleft()

    def done(self) -> list[tuple[Tag, float]]:
        """The measured steps since the last call, oldest first."""
        while self._pending and self._pending[0].end.query():
            step = self._pending.popleft()
            self._measured.append((step.tag, step.start.elapsed_time(step.end) / 1000.0))
        measured, self._measured = self._measured, []
        return measured
