"""What the load generator records per job, and the numbers it reports per run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime


@dataclass
class JobRecord:
    size: int
    submit: float  # client clock (epoch seconds) when the POST went out
    job_id: str = ""
    status: str = "pending"  # the job's final status, or "unfinished" past the hard cap
    created: float | None = None  # server times (epoch seconds): enqueued, started, ended
    started: float | None = None
    finished: float | None = None
    observed_end: float | None = None  # client clock when the long poll saw the end
    image_bytes: int = 0

    def observe_end(self, info: dict, now: float) -> None:
        self.status = info["status"]
        self.created = _epoch(info.get("created_at"))
        self.started = _epoch(info.get("started_at"))
        self.finished = _epoch(info.get("finished_at"))
        self.observed_end = now

    @property
    def latency(self) -> float | None:
        """End to end: POST sent to the job's end as the server recorded it."""
        end = self.finished or self.observed_end
        return None if end is None else max(end - self.submit, 0.0)

    @property
    def queue_wait(self) -> float | None:
        if self.started is None or self.created is None:
            return None
        return max(self.started - self.created, 0.0)


def _epoch(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(records: list[JobRecord], rejected: int, duration_s: float, mode: str, t0: float) -> dict:
    """Counts, latency percentiles, queue wait and throughput of one run.

    Throughput: open loop, images over the span from the first submission to the last finish
    (at most the offered rate; at overload the system's capacity); closed loop, images that
    finished inside the sending window after the first one finished (the start-up fill left
    out), over that part of the window."""
    succeeded = [r for r in records if r.status == "succeeded"]
    with_image = [r for r in succeeded if r.image_bytes > 0]
    lost = [r for r in records if r.status in ("pending", "unfinished")] + [r for r in succeeded if r.image_bytes <= 0]
    latencies = [r.latency for r in with_image if r.latency is not None]
    waits = [r.queue_wait for r in records if r.queue_wait is not None]
    ends = [e for e in (r.finished or r.observed_end for r in with_image) if e is not None]
    images_per_min = 0.0
    if mode == "open" and ends:
        span = max(ends) - min(r.submit for r in records)
        images_per_min = 60.0 * len(with_image) / span if span > 0 else 0.0
    elif ends:
        first, window_end = min(ends), t0 + duration_s
        inside = [e for e in ends if first < e <= window_end]
        if window_end > first:
            images_per_min = 60.0 * len(inside) / (window_end - first)
    by_size = {}
    for size in sorted({r.size for r in records}):
        lat = [r.latency for r in with_image if r.size == size and r.latency is not None]
        by_size[str(size)] = dict(completed=len(lat), p50_s=_round(percentile(lat, 50)), p95_s=_round(percentile(lat, 95)))
    return dict(
        submitted=len(records),
        rejected=rejected,
        completed=len(with_image),
        failed=sum(r.status == "failed" for r in records),
        canceled=sum(r.status == "canceled" for r in records),
        lost=len(lost),
        p50_s=_round(percentile(latencies, 50)),
        p95_s=_round(percentile(latencies, 95)),
        p99_s=_round(percentile(latencies, 99)),
        queue_wait_s=_round(sum(waits) / len(waits)) if waits else None,
        images_per_min=round(images_per_min, 3),
        by_size=by_size,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def count_duplicates(redis_url: str, job_ids: list[str]) -> int:
    """Jobs with more than one successful execution in RQ's result history (finished twice)."""
    from redis import Redis
    from rq.job import Job
    from rq.results import Result

    connection = Redis.from_url(redis_url)
    duplicates = 0
    for job_id in job_ids:
        try:
            job = Job.fetch(job_id, connection=connection)
        except Exception:  # expired or deleted: nothing to audit
            continue
        successes = sum(result.type == Result.Type.SUCCESSFUL for result in job.results())
        duplicates += successes > 1
    return duplicates
