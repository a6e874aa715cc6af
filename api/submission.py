"""Admitting a validated job: the caller's limits, the queue cap, then the queue, owned by the caller."""

from __future__ import annotations

from api import metrics
from api.errors import ApiError
from api.state import ApiState
from worker import client, keys
from worker.admission import NotReplicated, QueueFull
from worker.job_spec import ImageJob
from worker.webhook_subscription import Subscription


def submit(
    state: ApiState, spec: ImageJob, caller: str, job_id: str, user: str | None = None, webhook: Subscription | None = None
) -> None:
    """Enqueue `spec` as `job_id`, owned by `caller`, or raise a 429 ApiError (nothing enqueued).
    The queue cap is checked in the same atomic step as the enqueue (`worker.admission.CappedQueue`);
    `worker.admission.NotReplicated` passes through (the caller answers 503)."""
    try:
        state.key_limits.count_request(caller)
    except ApiError:
        metrics.JOBS_REJECTED.labels(reason="rate_limited").inc()
        raise
    try:
        state.key_limits.reserve(caller, job_id)
    except ApiError:
        metrics.JOBS_REJECTED.labels(reason="too_many_jobs").inc()
        raise
    try:
        client.enqueue(
            state.queue,
            spec,
            job_id=job_id,
            options=state.config.job_options,
            owner=caller,
            meta={keys.META_USER: user} if user else None,
            webhook=webhook,
        )
    except QueueFull:
        state.key_limits.release(caller, job_id)
        metrics.JOBS_REJECTED.labels(reason="queue_full").inc()
        raise ApiError(
            429,
            "queue_full",
            f"the queue holds {state.config.max_queued} jobs; retry later",
            headers={"Retry-After": str(state.config.retry_after)},
        ) from None
    except NotReplicated as exc:
        if exc.taken_back:
            state.key_limits.release(caller, job_id)
        else:
            state.jobs.add(caller, job_id)
        raise
    except BaseException:
        state.key_limits.release(caller, job_id)
        raise
    state.jobs.add(caller, job_id)
    metrics.JOBS_SUBMITTED.inc()
