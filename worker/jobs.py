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

from engine.request import GenerationRequest, RequestLimits, RequestValidationError
from worker import job_events, keys
from worker.contract import JobResult, ResultImage
from worker.job_spec import DEFAULT_COMPRESSION, ImageJob, image_request_id, split_request_id, validate_job
from worker.storage import RetryPolicy, Storage

log = logging.getLogger("sd3serve.worker")


class GenerationFailed(RuntimeError):
    """A request could not be generated; `code` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def job_from_kwargs(job_id: str, args: tuple | list, kwargs: dict[str, Any], limits: RequestLimits) -> ImageJob:
    """Validate a job's arguments as an image job (its request's id is the job id)."""
    if args:
        raise RequestValidationError("request", "pass the request as keyword arguments (prompt=..., steps=...)")
    return validate_job({**kwargs, "request_id": job_id}, limits)


def request_from_job(job_id: str, args: tuple | list, kwargs: dict[str, Any], limits: RequestLimits) -> GenerationRequest:
    """Validate a job's arguments as a generation request whose request_id is the job id."""
    return job_from_kwargs(job_id, args, kwargs, limits).generation


def encode_image(image: Any, output_format: str = "png", compression: int | None = None) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = DEFAULT_COMPRESSION if compression is None else compression
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def encode_png(image: Any) -> bytes:
    return encode_image(image, "png")


@dataclass(frozen=True)
class StoredImage:
    key: str
    url: str
    tries: int
    seconds: float
    index: int = 0
    seed: int | None = None


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 4)


def build_result(
    request: GenerationRequest | ImageJob,
    stored: StoredImage | list[StoredImage],
    generate_seconds: float,
    enqueued_at: datetime | None,
    started_at: datetime | None,
    finished_at: datetime,
    worker_name: str,
) -> dict[str, Any]:
    """What `job.return_value()` holds for a succeeded job: every image (key, url, seed), the
    first one also as `image_key` / `image_url` (the JSON of `worker.contract.JobResult`)."""
    spec = request if isinstance(request, ImageJob) else ImageJob(request)
    images = sorted(stored if isinstance(stored, list) else [stored], key=lambda s: s.index)
    timings = {
        "queue_seconds": _seconds_between(enqueued_at, started_at),
        "generate_seconds": round(generate_seconds, 4),
        "store_seconds": round(sum(s.seconds for s in images), 4),
        "total_seconds": _seconds_between(enqueued_at, finished_at),
    }
    generation = spec.generation
    return JobResult(
        images=tuple(ResultImage(s.key, s.url, spec.seeds[s.index], s.index) for s in images),
        n=spec.n,
        output_format=spec.output_format,
        content_type=spec.content_type,
        seed=generation.seed,
        width=generation.width,
        height=generation.height,
        steps=generation.steps,
        cache_interval=generation.cache_interval,
        timings={k: v for k, v in timings.items() if v is not None},
        storage_tries=sum(s.tries for s in images),
        worker=worker_name,
    ).to_dict()


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
    """Generate a job's images for `request` (the fields of `engine.request.GenerationRequest`,
    plus `n`, `output_format`, `output_compression`).

    Run by a stock RQ worker (or called directly), this loads the engine once per process from
    the SD3SERVE_* environment, generates this job's images alone (its n images as one batch),
    stores them and returns the result dict (image_key, image_url, images, seed, timings).
    """
    from rq import get_current_job

    job = get_current_job()
    try:
        return _generate_alone(job, args, request)
    finally:
        if job is not None:  # RQ records the outcome just after we return (or raise)
            job_events.announce(job.connection, job, job_events.ENDING)


def _generate_alone(job: Any, args: tuple, request: dict[str, Any]) -> dict[str, Any]:
    from rq.utils import now

    runtime = _get_runtime()
    job_id = job.id if job is not None else f"direct-{time.time_ns():x}"
    limits = getattr(runtime.engine, "limits", RequestLimits())
    spec = job_from_kwargs(job_id, args, request, limits)
    req = spec.generation
    started_at = now()
    if job is not None:
        job.meta.update({keys.META_STEP: 0, keys.META_TOTAL: req.steps, keys.META_SEED: req.seed, keys.META_BATCH_SIZE: spec.n})
        job.save_meta()
        job_events.announce(job.connection, job, job_events.STATUS)  # running, with its total
    engine = runtime.engine
    stored: list = []
    steps = 0

    def report_progress(report: Any) -> None:
        nonlocal steps
        steps += 1
        if job is not None and steps % runtime.progress_every == 0:
            progress = engine.progress(image_request_id(job_id, 0))
            if progress:
                job.meta[keys.META_STEP] = progress[0]
                job.save_meta()

    from engine.engine import RequestFailed
    from worker.durable_upload import StoreFailed

    try:  # the job's n images as one step-level batch
        finished = engine.run(spec.image_requests(job_id), progress=report_progress)
    except RequestFailed as exc:
        raise GenerationFailed(exc.code, exc.message) from None
    for item in finished:
        index = split_request_id(item.request.request_id)[1]
        try:  # held on disk and retried while storage is down; the job reads running meanwhile
            stored.append(runtime.uploader.store(job_id, item.image, time.monotonic(), spec, index))
        except StoreFailed as exc:
            raise GenerationFailed(exc.code, exc.message) from None
    if len(stored) != spec.n:
        raise GenerationFailed("engine_error", "the engine stopped without finishing the request")
    enqueued = job.enqueued_at if job is not None else started_at
    return build_result(
        spec,
        stored,
        max(item.seconds for item in finished),
        enqueued,
        started_at,
        now(),
        (job.worker_name or "") if job is not None else "",
    )
