"""The REST endpoints of jobs. Handlers are thin: validation, then `worker.client` against Redis.
Each is a module-level function; what it needs arrives through FastAPI dependencies (api/deps.py,
api/auth.py), and `build_router` registers them.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations.
"""

import hashlib
import json
import logging
import time
import uuid
from typing import Annotated, Any, Optional

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel

from api import job_views, long_poll, metrics, submission
from api.auth import Caller
from api.config import ApiConfig
from api.deps import RedisConn, State, Storage
from api.endpoint import specialize
from api.errors import ApiError
from api.events import add_event_routes
from api.schemas import ERRORS, JobId, JobResponse, job_request_model
from api.state import ApiState
from engine.request import RequestValidationError
from worker import client, contract, keys
from worker.admission import NotReplicated
from worker.client import JobNotCancelable, JobNotFound
from worker.job_spec import CONTENT_TYPES, validate_job
from worker.storage import LocalStorage, StorageError
from worker.webhook_subscription import subscribe

log = logging.getLogger("sd3serve.api")
MAX_IDEMPOTENCY_KEY = 255
WAIT_DESCRIPTION = "Long poll: hold the request up to this many seconds until the job ends."


def create_job(
    body: BaseModel,  # the app's JobRequest (api.schemas.job_request_model), set by build_router
    request: Request,
    response: Response,
    state: State,
    caller: Caller,
    idempotency_key: Optional[str] = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY,
        description="Retrying with the same key returns the same job.",
    ),
) -> Any:
    fields = body.model_dump(exclude_none=True)
    request_fields = {k: v for k, v in fields.items() if k not in ("webhook", "webhook_events_filter")}
    try:
        spec = validate_job(request_fields, state.config.limits)
        subscription = None
        if "webhook" in fields or "webhook_events_filter" in fields:
            subscription = subscribe(fields.get("webhook"), fields.get("webhook_events_filter"), state.config.webhook)
    except RequestValidationError as exc:
        metrics.JOBS_REJECTED.labels(reason="validation").inc()
        raise ApiError(422, "invalid_request", str(exc), field=exc.field) from None
    job_id = uuid.uuid4().hex
    idem_key = None
    if idempotency_key is not None:
        idem_key = keys.idempotency_key(caller, idempotency_key)
        fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        record = json.dumps({"job_id": job_id, "fingerprint": fingerprint, "at": time.time()})
        while not state.redis.set(idem_key, record, nx=True, ex=state.config.idempotency_ttl):
            replayed = replay(state, idem_key, fingerprint, request, response)
            if replayed is not None:
                return replayed
    try:  # per-key limits, then the cap check and the enqueue as one atomic step (worker/admission.py)
        with state.queue.keeping_unreplicated(idem_key is not None):
            submission.submit(state, spec, caller, job_id, webhook=subscription)
    except NotReplicated:  # with an Idempotency-Key the job stays: a retry gets it
        raise unconfirmed(state.config) from None
    except ApiError:
        if idem_key:
            state.redis.delete(idem_key)
        raise
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job_views.job_response(state, job_views.find(state, job_id, caller), request)


def unconfirmed(config: ApiConfig) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        "the job queue could not confirm the job on a replica; retry (with the same Idempotency-Key to get the same job)",
        headers={"Retry-After": str(config.retry_after)},
    )


def replay(state: ApiState, idem_key: str, fingerprint: str, request: Request, response: Response) -> Any:
    """The job an earlier request with this key created; None if that job has expired."""
    deadline = time.monotonic() + 5
    while True:
        stored = json.loads(state.redis.get(idem_key) or "{}")
        if stored.get("fingerprint") not in (None, fingerprint):
            raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request")
        try:
            info = client.status(state.redis, stored.get("job_id", ""))
            break
        except JobNotFound:
            if not stored or time.time() - stored.get("at", 0) > 10:
                state.redis.delete(idem_key)  # the job it named has expired: start afresh
                return None
            if time.monotonic() > deadline:  # the first request is still enqueueing
                raise ApiError(
                    409, "idempotency_conflict", "a request with this Idempotency-Key is still being processed"
                ) from None
            time.sleep(0.05)
    if not state.queue.replicated():  # the job may still be only on the master
        raise unconfirmed(state.config)
    response.headers["Location"] = f"/v1/jobs/{info.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return job_views.job_response(state, info, request)


async def get_job(
    job_id: JobId,
    request: Request,
    state: State,
    caller: Caller,
    wait: float = 0,  # bounded by the app's max_wait, set by build_router
) -> Any:
    info = await long_poll.until_done(state, job_id, caller, wait, request)
    return await anyio.to_thread.run_sync(job_views.job_response, state, info, request)


def cancel_job(job_id: JobId, request: Request, state: State, redis: RedisConn, caller: Caller) -> Any:
    job_views.find(state, job_id, caller)  # another key's job is not found
    try:
        info = client.cancel(redis, job_id)
    except JobNotFound:
        raise ApiError(404, "not_found", f"no job with id {job_id!r}") from None
    except JobNotCancelable as exc:
        raise ApiError(409, "already_finished", f"job {job_id} already {exc.info.status}") from None
    return job_views.job_response(state, info, request)


def get_image(
    job_id: JobId,
    state: State,
    storage: Storage,
    caller: Caller,
    index: int = Query(0, ge=0, le=99, description="Which image: 0 to n-1."),
) -> Response:
    info = job_views.find(state, job_id, caller)
    if info.status != contract.SUCCEEDED or not info.result:
        raise ApiError(409, "not_ready", f"job {job_id} is {info.status}; its image exists once it succeeded")
    image_keys = info.image_keys
    if index >= len(image_keys):
        raise ApiError(
            404, "not_found", f"job {job_id} has {len(image_keys)} images (index 0 to {len(image_keys) - 1})", field="index"
        )
    key = image_keys[index]
    if isinstance(storage, LocalStorage):
        try:
            return Response(storage.get(key), media_type=info.result.get("content_type", "image/png"))
        except StorageError as exc:
            log.error("image of job %s missing from storage: %s", job_id, exc)
            raise ApiError(404, "image_missing", f"the image of job {job_id} is missing from storage") from None
    return RedirectResponse(storage.url(key), status_code=302)


def build_router(config: ApiConfig) -> APIRouter:
    """The job routes. `config` shapes only the schema (the request model from its limits, the
    long-poll bound); the handlers read the app's state through their dependencies."""
    wait = Annotated[float, Query(ge=0, le=config.max_wait, allow_inf_nan=False, description=WAIT_DESCRIPTION)]
    router = APIRouter()
    router.add_api_route(
        "/v1/jobs",
        specialize(create_job, body=job_request_model(config.limits)),
        methods=["POST"],
        status_code=202,
        response_model=JobResponse,
        tags=["jobs"],
        summary="Submit an image generation job",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/jobs/{job_id}",
        specialize(get_job, wait=wait),
        methods=["GET"],
        response_model=JobResponse,
        tags=["jobs"],
        summary="A job's status",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/jobs/{job_id}/cancel",
        cancel_job,
        methods=["POST"],
        response_model=JobResponse,
        tags=["jobs"],
        summary="Cancel a job",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/jobs/{job_id}/image",
        get_image,
        methods=["GET"],
        tags=["jobs"],
        summary="One of the job's images",
        responses={
            200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
            302: {"description": "Redirect to the image"},
            **ERRORS,
        },
    )
    add_event_routes(router)
    return router
