"""A benchmark result row of bench/engine_bench.py, for the tests of its summary, merge and plots."""

from __future__ import annotations

from typing import Any


def bench_row(
    system: str, mode: str, size: int, batch: int, images_per_s: float, latency: float | None = None, **extra: Any
) -> dict:
    """One SD3-medium row; `latency` (seconds per image) defaults to batch / images_per_s."""
    return dict(
        system=system,
        mode=mode,
        model="sd3-medium",
        size=size,
        batch=batch,
        images_per_s=images_per_s,
        seconds_per_image_latency=batch / images_per_s if latency is None else latency,
        ms_per_step=10.0,
        **extra,
    )
