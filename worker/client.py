"""Submit image jobs to the sd3serve queue from Python, check on them and wait for them.

This is the Redis path; it needs no API server, only the Redis the workers listen on::

    from redis import Redis
    from worker import client

    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    job_id = client.submit(redis, prompt="a red circle on a blue background", steps=20, seed=7,
                           n=2, output_format="webp")   # two images, seeds 7 and 8
    info = client.wait(redis, job_id, timeout=300)      # a JobInfo
    print(info.status, info.seed, info.image_urls)

Plain RQ works as well, and such jobs show up in `client.status` and the REST API like any other::

    from rq import Queue, Retry
    Queue("sd3serve", connection=redis).enqueue(
        "worker.jobs.generate", prompt="a green square on a white background", retry=Retry(max=2))

Requests are validated here, before anything is enqueued, with the same rules as the API
(`engine.request.validate_request`); a missing seed is drawn now, so it is known at once.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Mapping

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from engine.request import GenerationRequest, RequestLimits
from worker import contract, job_events, keys, webhook_queue
from worker.contract import JobError, JobState, Progress
from worker.job_spec import ImageJob, validate_job
from worker.webhook_subscription import Subscription, subscribe

TERMINAL = contract.TERMINAL  # kept for callers of client.TERMINAL
DEFAULT_JOB_TIMEOUT = 600  # seconds a job may run once started
DEFAULT_RESULT_TTL = 24 * 3600  # seconds a finished job and its result stay in Redis
DEFAULT_FAILURE_TTL = 7 * 24 * 3600
DEFAULT_RETRIES = 2  # re-runs after a worker crash or a transient failure


@dataclass(frozen=True)
class JobOptions:
    """How RQ keeps a generation job: re-runs, time limit, and how long results stay."""

    retries: int = DEFAULT_RETRIES
    job_timeout: int = DEFAULT_JOB_TIMEOUT
    result_ttl: int = DEFAULT_RESULT_TTL
    failure_ttl: int = DEFAULT_FAILURE_TTL

    def __post_init__(self) -> None:
        if self.retries < 0 or self.job_timeout < 1:
            raise ValueError("retries must be >= 0 and job_timeout >= 1")


class JobNotFound(LookupError):
    """No sd3serve job with this id (never existed, expired, or not a generation job)."""


class JobNotCancelable(RuntimeError):
    """The job already ended; `info` says how."""

    def __init__(self, info: "JobInfo") -> None:
        super().__init__(f"job {info.id} already {info.status}")
        self.info = info


@dataclass
class JobInfo:
    id: str
    status: JobState
    queue_position: int | None  # jobs ahead of it in the queue; None unless queued
    progress: Progress
    created_at: datetime | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    seed: int | None
    request: dict[str, Any]
    result: dict[str, Any] | None = None  # the JSON of a contract.JobResult
    error: JobError | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    webhook: dict[str, Any] | None = None  # delivery state, when the job has a webhook

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def owner(self) -> str | None:
        """owner_id of the API key that created the job (None: enqueued straight through Redis)."""
        return self.meta.get(keys.META_OWNER)

    @property
    def image_keys(self) -> list[str]:
        """Storage keys of every image of a succeeded job, in seed order."""
        return contract.result_image_keys(self.result)

    @property
    def image_urls(self) -> list[str]:
        """The workers' URLs of the images (presigned for S3; file:// for local storage)."""
        return contract.result_image_urls(self.result)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("created_at", "enqueued_at", "started_at", "finished_at"):
            value = data[name]
            data[name] = value.isoformat() if value else None
        return data


def submit(
    connection: Redis,
    request: Mapping[str, Any] | None = None,
    *,
    queue: str = keys.DEFAULT_QUEUE,
    limits: RequestLimits = RequestLimits(),
    job_id: str | None = None,
    options: JobOptions = JobOptions(),
    webhook: str | None = None,
    webhook_events_filter: Any = None,
    owner: str | None = None,
    **fields: Any,
) -> str:
    """Validate a request (a dict and/or keyword fields, `n` and `output_format` included) and
    enqueue it. Returns the job id. `owner` (`keys.owner_id(api_key)`) makes the job that API key's.

    `webhook` (an http(s) URL) is called, signed, on the events in `webhook_events_filter`
    (`start`, `completed`; default `completed`); the settings are SD3SERVE_WEBHOOK_*.
    Raises `engine.request.RequestValidationError` (with `.field` and `.message`) for a bad request.
    """
    spec = validate_job({**(request or {}), **fields}, limits)
    subscription = None
    if webhook is not None or webhook_events_filter is not None:
        subscription = subscribe(webhook, webhook_events_filter)
    return enqueue(Queue(queue, connection=connection), spec, job_id=job_id, options=options, owner=owner, webhook=subscription)


def enqueue(
    queue: Queue,
    generation: GenerationRequest | ImageJob,
    *,
    job_id: str | None = None,
    options: JobOptions = JobOptions(),
    owner: str | None = None,
    meta: Mapping[str, Any] | None = None,
    webhook: "Subscription | None" = None,
) -> str:
    """Enqueue an already validated request or image job. Returns the job id."""
    spec = generation if isinstance(generation, ImageJob) else ImageJob(generation)
    generation = spec.generation
    kwargs = spec.job_kwargs()
    job_meta = {keys.META_STEP: 0, keys.META_TOTAL: generation.steps, keys.META_SEED: generation.seed, **(meta or {})}
    if owner is not None:
        job_meta[keys.META_OWNER] = owner
    if webhook is not None:
        job_meta[webhook_queue.META_WEBHOOK] = webhook.to_meta()
    job = queue.enqueue_call(
        keys.JOB_FUNC,
        kwargs=kwargs,
        job_id=job_id,
        timeout=options.job_timeout,
        result_ttl=options.result_ttl,
        failure_ttl=options.failure_ttl,
        retry=Retry(max=options.retries) if options.retries > 0 else None,
        meta=job_meta,
        description=f"generate {spec.n} x {generation.width}x{generation.height}: {generation.prompt[:60]}",
    )
    return job.id


def fetch_job(connection: Redis, job_id: str) -> Job:
    """The RQ job behind an sd3serve job id; `JobNotFound` if there is none."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except (NoSuchJobError, ValueError):
        raise JobNotFound(job_id) from None
    if not keys.is_generation(job):
        raise JobNotFound(job_id)
    return job


def status(connection: Redis, job_id: str) -> JobInfo:
    """Everything known about a job. Raises `JobNotFound`."""
    return job_info(fetch_job(connection, job_id))


def job_info(job: Job) -> JobInfo:
    rq_status = job.get_status(refresh=False)
    state = contract.state_of(rq_status)
    meta = job.meta or {}
    kwargs = dict(job.kwargs or {})
    position = None
    if rq_status == JobStatus.QUEUED:
        position = Queue(job.origin, connection=job.connection).get_job_position(job.id)
    total = meta.get(keys.META_TOTAL) or kwargs.get("steps") or 0
    step = meta.get(keys.META_STEP) or 0
    result = error = None
    if state == contract.SUCCEEDED:
        result = job.return_value()
        step = total
    elif state == contract.FAILED:
        error = _error_of(job, meta)
    seed = kwargs.get("seed", meta.get(keys.META_SEED))
    if seed is None and result:
        seed = result.get("seed")
    return JobInfo(
        id=job.id,
        status=state,
        queue_position=position,
        progress={"step": int(step), "total": int(total)},
        created_at=job.created_at,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at if state != contract.QUEUED else None,
        finished_at=job.ended_at if state in contract.TERMINAL and state != contract.CANCELED else None,
        seed=seed,
        request=kwargs,
        result=result,
        error=error,
        meta=dict(meta),
        webhook=(webhook_queue.status_of(job.connection, job.id) if webhook_queue.subscription(meta) is not None else None),
    )


def _error_of(job: Job, meta: Mapping[str, Any]) -> JobError:
    recorded = meta.get(keys.META_ERROR)
    if isinstance(recorded, Mapping) and "message" in recorded:
        return {"code": str(recorded.get("code", "generation_failed")), "message": str(recorded["message"])}
    latest = job.latest_result()
    text = (latest.exc_string or "") if latest else ""
    if latest is not None and latest.type == Result.Type.MAX_RETRIES_EXCEEDED:
        return {"code": "retries_exhausted", "message": "the job failed on every retry"}
    if "AbandonedJobError" in text or "Moved to FailedJobRegistry" in text:
        return {"code": "worker_lost", "message": "the worker running this job stopped and no retries were left"}
    if "JobTimeoutException" in text:
        return {"code": "timeout", "message": "the job ran longer than its timeout"}
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return {"code": "worker_error", "message": scrub(lines[-1]) if lines else "the job failed"}


_INTERNAL = re.compile(r"[a-z][a-z0-9+.-]*://\S+|\b[\w.-]+:\d{2,5}\b|\[[0-9a-f:]+\](:\d+)?", re.IGNORECASE)


def scrub(message: str) -> str:
    """An exception text fit for clients: URLs and host:port pairs replaced (the worker log has them)."""
    return _INTERNAL.sub("<internal>", message)


def wait(connection: Redis, job_id: str, timeout: float | None = None, poll: float = 0.25) -> JobInfo:
    """Block until the job succeeds, fails or is canceled; `TimeoutError` after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = status(connection, job_id)
        if info.done:
            return info
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {info.status} after {timeout} s")
        time.sleep(poll)


def cancel(connection: Redis, job_id: str) -> JobInfo:
    """Cancel a queued or running job (a running one leaves its batch at the next step).

    Canceling a canceled job is a no-op; a job that already ended raises `JobNotCancelable`.
    """
    job = fetch_job(connection, job_id)
    info = job_info(job)
    if info.status == contract.CANCELED:
        return info
    if info.done:
        raise JobNotCancelable(info)
    try:
        job.cancel()
    except InvalidJobOperation:
        pass  # canceled meanwhile
    job.refresh()
    if job.get_status(refresh=False) == JobStatus.CANCELED:
        job_events.announce(connection, job, job_events.STATUS)
        webhook_queue.notify(connection, job, "completed")
    return job_info(job)
