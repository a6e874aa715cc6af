"""Timing and memory helpers for the GPU benchmark (they degrade to wall-clock on the CPU)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks the end of each denoising step without synchronising: CUDA events on the GPU,
    host time on the CPU. `timed` marks the start too, so the first interval is the first step
    (prompt encoding, admission, allocations) and the last one the last step (with the VAE
    decode, where it runs inside the step). `ms_per_step()` is the mean over the steady steps
    between them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks = []
        self.mark()

    def mark(self, *_args, **_kwargs):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return {}

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]

    def ms_per_step(self) -> float | None:
        steady = self.intervals_ms()[1:-1]
        return sum(steady) / len(steady) if steady else None


class GcPauses:
    """Time the cyclic garbage collector ran inside a `with` block."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.ms += (time.perf_counter() - self._started) * 1000

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


@dataclass
class Run:
    seconds: float
    ms_per_step: float | None
    peak_bytes: int
    step_ms: list[float] = field(default_factory=list)
    gc_ms: float = 0.0


def timed(device: torch.device, fn, clock: StepClock | None = None) -> Run:
    """Run `fn()` once from a synchronised start to a synchronised end; peak memory over it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    if clock is not None:
        clock.start()
    with GcPauses() as pauses:
        fn()
        synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    step_ms = clock.intervals_ms() if clock else []
    return Run(seconds, clock.ms_per_step() if clock else None, peak, step_ms, round(pauses.ms, 1))


def median(values: list[float]) -> float:
    return statistics.median(values)


def event_time_ms(device: torch.device, fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of `fn()` over `repeats` runs (device events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return median(times)


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """The card's dense matmul rate on random data (the MFU yardstick)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = event_time_ms(device, lambda: a @ b, repeats=10, warmup=3)
    return 2 * n**3 / (ms / 1000) / 1e12


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    fast, ref = fast.double(), ref.double()
    return float(torch.linalg.vector_norm(fast - ref) / torch.linalg.vector_norm(ref))


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for card in ("h200", "h100", "a100", "l40s", "b200"):
        if card in name:
            return card
    return name.split()[-1]
