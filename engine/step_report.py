"""What one engine step reports (finished, failed and canceled requests, batch size, FRESH
ratio, step time). Pure Python (the images are PIL images), so the worker, tests and the fleet
simulation's fake engine share the engine's own types without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from engine.request import GenerationRequest


@dataclass(frozen=True)
class FinishedRequest:
    request: GenerationRequest
    image: Image.Image
    seconds: float  # from admission to decoded image
    fresh_steps: int


@dataclass(frozen=True)
class FailedRequest:
    request: GenerationRequest
    code: str
    message: str


class RequestFailed(RuntimeError):
    """A request the engine could not generate (`code`: machine-readable, e.g. out_of_memory)."""

    def __init__(self, failed: list[FailedRequest]) -> None:
        super().__init__("; ".join(f.message for f in failed))
        self.failed = failed
        self.code = failed[0].code
        self.message = failed[0].message


@dataclass
class StepReport:
    finished: list[FinishedRequest] = field(default_factory=list)
    failed: list[FailedRequest] = field(default_factory=list)
    canceled: list[GenerationRequest] = field(default_factory=list)
    batch_size: int = 0
    fresh_ratio: float = 0.0
    step_seconds: float = 0.0
    size: tuple[int, int] | None = None  # (height, width) of the sub-batch that ran; None: no step ran
    # Device seconds (CUDA events) of the steps measured since the last report, each with its own
    # sub-batch size: on a GPU the device finishes a step after the host has moved on, so these
    # are earlier steps than the one this report is for.
    measured: list[tuple[tuple[int, int], float]] = field(default_factory=list)

    @property
    def device_seconds(self) -> float:
        return sum(seconds for _, seconds in self.measured)
