"""Prometheus metrics exported by the API process (`GET /metrics`).

Names follow Prometheus conventions: `sd3serve_` prefix, base units in the name, `_total` on
counters (prometheus_client appends it). The queue depth is read from Redis when Prometheus
scrapes, never cached, so it is exact at scrape time and costs nothing between scrapes; a read
that hangs (Redis or its Sentinels unreachable) is given up after `DEPTH_TIMEOUT_S`, so a scrape
never waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import FastAPI, Request, Response

log = logging.getLogger(__name__)

# HTTP handlers answer in milliseconds; long-polls (`?wait=`) hold a request up to a minute.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

JOBS_SUBMITTED = Counter(
    "sd3serve_jobs_submitted_total",
    "Generation jobs accepted by the API and put on the queue.",
)
JOBS_REJECTED = Counter(
    "sd3serve_jobs_rejected_total",
    "Job submissions refused by the API, by reason (validation, queue_full, too_large, unauthorized, forbidden, "
    "rate_limited, too_many_jobs).",
    ["reason"],
)
REQUEST_LATENCY = Histogram(
    "sd3serve_http_request_duration_seconds",
    "Time the API took to answer an HTTP request, by method, route template and status code.",
    ["method", "route", "status"],
    buckets=HTTP_BUCKETS,
)

QUEUE_DEPTH_NAME = "sd3serve_queue_depth"
DEPTH_TIMEOUT_S = 1.0  # well under Prometheus' default 10 s scrape timeout


class QueueDepthCollector(Collector):
    """Reports `sd3serve_queue_depth` by calling `depth()` at scrape time.

    `depth()` returns the number of jobs waiting in the queue (e.g. `len(rq.Queue)`). When it
    raises (Redis down), the gauge is left out of that scrape instead of failing the scrape,
    so `/metrics` keeps answering and the gap shows on the dashboard.
    """

    def __init__(self, depth: Callable[[], int], queue: str = "sd3serve", timeout_s: float = DEPTH_TIMEOUT_S) -> None:
        self._depth = depth
        self._queue = queue
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._read: _DepthRead | None = None  # the read in flight; at most one, even if it hangs

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            QUEUE_DEPTH_NAME, "Jobs waiting in the Redis queue (not yet taken by a worker).", labels=["queue"]
        )
        with self._lock:
            if self._read is None or self._read.done.is_set():
                self._read = _DepthRead(self._depth)
            read = self._read
        if not read.done.wait(self._timeout_s):
            log.warning("queue depth unavailable for metrics: no answer from Redis in %.1f s", self._timeout_s)
            return
        if read.error is not None:  # a scrape must not fail because Redis is briefly unreachable
            log.warning("queue depth unavailable for metrics: %s", read.error)
            return
        family.add_metric([self._queue], float(read.value))
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Describing without calling depth() lets registration happen before Redis is up.
        yield GaugeMetricFamily(QUEUE_DEPTH_NAME, "Jobs waiting in the Redis queue.", labels=["queue"])


class _DepthRead:
    """One call of `depth()` on a daemon thread, so a hung Redis call holds no scrape (or exit)."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.done = threading.Event()
        self.value = 0
        self.error: Exception | None = None
        threading.Thread(target=self._run, args=(depth,), name="queue-depth", daemon=True).start()

    def _run(self, depth: Callable[[], int]) -> None:
        try:
            self.value = depth()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


_queue_collectors: dict[int, QueueDepthCollector] = {}


def register_queue_depth(
    depth: Callable[[], int], queue: str = "sd3serve", registry: CollectorRegistry = REGISTRY
) -> QueueDepthCollector:
    """Export `sd3serve_queue_depth{queue=...}` from `depth()`; replaces an earlier registration
    on the same registry (an app factory may run more than once in a process, e.g. in tests)."""
    previous = _queue_collectors.pop(id(registry), None)
    if previous is not None:
        try:
            registry.unregister(previous)
        except KeyError:
            pass
    collector = QueueDepthCollector(depth, queue)
    registry.register(collector)
    _queue_collectors[id(registry)] = collector
    return collector


def render_metrics(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The body and content type for a `/metrics` response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    REQUEST_LATENCY.labels(method=method, route=route, status=str(status)).observe(seconds)


def instrument_app(app: FastAPI) -> None:
    """Add middleware to a FastAPI/Starlette app that times every request into REQUEST_LATENCY.

    The `route` label is the route template (`/v1/jobs/{job_id}`), never the raw path, so job
    ids do not blow up the label cardinality; files under a mount (the playground at `/`) are
    labelled `<mount>/{path}`, paths no route matches `unmatched`.
    """

    @app.middleware("http")
    async def _time_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            observe_request(request.method, _route_template(app, request.scope), status, time.perf_counter() - start)


def _route_template(app: FastAPI, scope: Mapping[str, Any]) -> str:
    from starlette.routing import Mount

    route = scope.get("route")  # FastAPI's routes put themselves here
    if route is not None and getattr(route, "path", None):
        return route.path
    endpoint = scope.get("endpoint")  # a Mount leaves its app here
    for candidate in app.routes:
        if isinstance(candidate, Mount) and endpoint is not None and candidate.app is endpoint:
            return f"{candidate.path}/{{path}}"
    return "unmatched"
