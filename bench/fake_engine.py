"""A stand-in for `engine.engine.Engine` with the contract `BatchWorker` uses, and no torch.

Each `step()` sleeps one configured step time (the H200's, by default) and advances every
running request by one step, so a worker built on it makes exactly the Redis traffic a GPU
worker makes at that pace. Finished requests come back with a small real PNG-able PIL image,
so the upload path and storage run too. For the fleet simulation (bench/fleet_sim.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from engine.request import GenerationRequest, RequestLimits
from engine.step_report import FinishedRequest, StepReport

# sd3serve on the H200 at 1024², 28 steps, ~14 running: 1.10 images/s (bench/results/serving_h200.json),
# so one step of the batch takes about 14 / 1.10 / 28 = 0.45 s.
H200_STEP_SECONDS = 0.45
H200_BATCH = 14


@dataclass
class _Running:
    request: GenerationRequest
    admitted: float
    step: int = 0
    canceled: bool = False


class FakeEngine:
    def __init__(
        self, limits: RequestLimits, step_seconds: float = H200_STEP_SECONDS, max_batch: int = H200_BATCH, image_side: int = 32
    ) -> None:
        if step_seconds < 0 or max_batch < 1 or image_side < 1:
            raise ValueError("step_seconds must be >= 0, max_batch and image_side >= 1")
        self.limits = limits
        self.step_seconds = step_seconds
        self.max_batch = max_batch
        self.image_side = image_side
        self._running: dict[str, _Running] = {}
        self.steps_run = 0

    def admission_slots(self) -> int:
        return max(self.max_batch - len(self._running), 0)

    def add(self, request: GenerationRequest) -> None:
        if request.request_id in self._running:
            raise ValueError(f"request {request.request_id} is already running")
        self._running[request.request_id] = _Running(request, time.monotonic())

    def cancel(self, request_id: str) -> bool:
        running = self._running.get(request_id)
        if running is None:
            return False
        running.canceled = True
        return True

    def has_work(self) -> bool:
        return bool(self._running)

    def progress(self, request_id: str) -> tuple[int, int] | None:
        running = self._running.get(request_id)
        return None if running is None else (running.step, running.request.steps)

    def running_ids(self) -> list[str]:
        return [rid for rid, r in self._running.items() if not r.canceled]

    def drop_canceled(self) -> list[GenerationRequest]:
        dropped = [r.request for r in self._running.values() if r.canceled]
        for request in dropped:
            del self._running[request.request_id]
        return dropped

    def cache_bytes(self) -> int:
        return 0

    def cache_allocated_bytes(self) -> int:
        return 0

    def step(self) -> StepReport:
        report = StepReport(canceled=self.drop_canceled(), fresh_ratio=1.0)  # exact steps: all FRESH
        if not self._running:
            return report
        start = time.monotonic()
        time.sleep(self.step_seconds)
        self.steps_run += 1
        report.batch_size = len(self._running)
        done = time.monotonic()
        for running in list(self._running.values()):
            running.step += 1
            if running.step >= running.request.steps:
                del self._running[running.request.request_id]
                report.finished.append(
                    FinishedRequest(running.request, self._image(running.request), done - running.admitted, running.step)
                )
        report.step_seconds = time.monotonic() - start
        return report

    def _image(self, request: GenerationRequest) -> Image.Image:
        shade = request.seed % 256
        return Image.new("RGB", (self.image_side, self.image_side), (shade, 255 - shade, 128))
