"""The job function, `worker.jobs.generate(**request)`, and what every worker does with a
finished image (encode, store with retries, describe it in the job's result).

A stock `rq worker sd3serve` runs `generate` like any RQ job: it loads the engine once per
process and produces that one image on its own — the one-job-at-a-time baseline. The batching
worker (`worker.BatchWorker`) never calls it: it recognises jobs whose function is
`worker.jobs.generate` and feeds their requests to one shared step loop instead.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.request import GenerationRequest, RequestLimits, RequestValidationError, validate_request
from worker import keys
from worker.storage import RetryPolicy, Storage

log = logging.getLogger("sd3serve.worker")


class GenerationFailed(RuntimeError):
    """A request could not be generated; `code` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def request_from_job(job_id: str, args: tuple | list, kwargs: dict[str, Any], limits: RequestLimits) -> GenerationRequest:
    """Validate a job's arguments as a generation request whose request_id is the job id."""
    if args:
        raise RequestValidationError("request", "pass the request as keyword arguments (prompt=..., steps=...)")
    return validate_request({**kwargs, "request_id": job_id}, limits)


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class StoredImage:
    key: str
    url: str
    tries: int
    seconds: float


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 4)


def build_result(
    request: GenerationRequest,
    stored: StoredImage,
    generate_seconds: float,
    enqueued_at: datetime | None,
    started_at: datetime | None,
    finished_at: datetime,
    worker_name: str,
) -> dict[str, Any]:
    """What `job.return_value()` holds for a succeeded job."""
    timings = {
        "queue_seconds": _seconds_between(enqueued_at, started_at),
        "generate_seconds": round(generate_seconds, 4),
        "store_seconds": round(stored.seconds, 4),
        "total_seconds": _seconds_between(enqueued_at, finished_at),
    }
    return {
        "image_key": stored.key,
        "image_url": stored.url,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "cache_interval": request.cache_interval,
        "timings": {k: v for k, v in timings.items() if v is not None},
        "storage_tries": stored.tries,
        "worker": worker_name,
    }


# -- the stock-worker path -----------------------------------------------------------------------
_runtime: "_Runtime | None" = None


@dataclass
class _Runtime:
    engine: Any
    storage: Storage
    key_prefix: str
    retry: RetryPolicy
    progress_every: int
    uploader: Any = None  # a DurableUploader (worker.durable_upload)


def _get_runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        from engine.engine import Engine
        from worker.config import WorkerConfig
        from worker.storage import storage_from_config

        from worker.durable_upload import DurableUploader

        config = WorkerConfig.from_env()
        storage = storage_from_config(config.storage)
        storage.ensure_ready()
        _runtime = _Runtime(
            engine=Engine.from_config(config.engine),
            storage=storage,
            key_prefix=config.storage.key_prefix,
            retry=config.storage.retry,
            progress_every=config.progress_every,
            uploader=DurableUploader(storage, config.storage, threads=1),
        )
    return _runtime


def generate(*args: Any, **request: Any) -> dict[str, Any]:
    """Generate one image for `request` (the fields of `engine.request.GenerationRequest`).

    Run by a stock RQ worker (or called directly), this loads the engine once per process from
    the SD3SERVE_* environment, generates this request alone, stores the PNG and returns the
    result dict (image_key, image_url, seed, width, height, timings).
    """
    from rq import get_current_job
    from rq.utils import now

    job = get_current_job()
    runtime = _get_runtime()
    job_id = job.id if job is not None else f"direct-{time.time_ns():x}"
    limits = getattr(runtime.engine, "limits", RequestLimits())
    req = request_from_job(job_id, args, request, limits)
    started_at = now()
    if job is not None:
        job.meta.update({keys.META_STEP: 0, keys.META_TOTAL: req.steps, keys.META_SEED: req.seed,
                         keys.META_BATCH_SIZE: 1})
        job.save_meta()
    engine = runtime.engine
    steps = 0

    def report_progress(report: Any) -> None:
        nonlocal steps
        steps += 1
        if job is not None and steps % runtime.progress_every == 0:
            progress = engine.progress(req.request_id)
            if progress:
                job.meta[keys.META_STEP] = progress[0]
                job.save_meta()

    from engine.engine import RequestFailed

    try:
        finished = engine.run([req], progress=report_progress)
    except RequestFailed as exc:
        raise GenerationFailed(exc.code, exc.message) from None
    from worker.durable_upload import StoreFailed

    for item in finished:
        try:  # held on disk and retried while storage is down; the job reads running meanwhile
            stored = runtime.uploader.store(job_id, item.image, time.monotonic())
        except StoreFailed as exc:
            raise GenerationFailed(exc.code, exc.message) from None
        enqueued = job.enqueued_at if job is not None else started_at
        return build_result(req, stored, item.seconds, enqueued, started_at, now(),
                            job.worker_name if job is not None else "")
    raise GenerationFailed("engine_error", "the engine stopped without finishing the request")
