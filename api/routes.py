"""The REST endpoints. Handlers are thin: validation, then `worker.client` against Redis.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and the
job request model is built per app from its limits (a local name, not a module global).
"""
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from redis import Redis
from rq import Queue

from api import metrics
from api.config import ApiConfig
from api.errors import ApiError
from api.schemas import ERRORS, JobResponse, JobId
from engine.request import RequestValidationError, validate_request
from worker import client, job_view, keys
from worker.admission import NotReplicated, QueueFull
from worker.client import JobInfo, JobNotCancelable, JobNotFound
from worker.storage import LocalStorage, StorageError
from worker.webhook_subscription import subscribe
from api.events import add_event_routes

log = logging.getLogger("sd3serve.api")
MAX_IDEMPOTENCY_KEY = 255


@dataclass
class ApiState:
    config: ApiConfig
    redis: Redis
    storage: Any
    job_request: type[BaseModel]
    queue: Queue


def build_router(state: ApiState) -> APIRouter:
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description="An API key, when the server has SD3SERVE_API_KEYS set.")
    JobRequest = state.job_request

    def authenticate(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> str:
        """The caller's identity: a digest of its API key ('anonymous' when keys are off)."""
        if not state.config.api_keys:
            return "anonymous"
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            metrics.JOBS_REJECTED.labels(reason="unauthorized").inc()
            raise ApiError(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        given = credentials.credentials.encode()
        if not any(_same(given, key.encode()) for key in state.config.api_keys):
            metrics.JOBS_REJECTED.labels(reason="forbidden").inc()
            raise ApiError(403, "forbidden", "this API key is not valid")
        return hashlib.sha256(given).hexdigest()[:16]

    def job_response(info: JobInfo, request: Request) -> dict[str, Any]:
        image_url = image_url_for(info, request) if info.status == "succeeded" and info.result else None
        body = job_view.status_body(info, image_url)
        return JobResponse.model_validate(body).model_dump(mode="json")

    def image_url_for(info: JobInfo, request: Request) -> str:
        if isinstance(state.storage, LocalStorage):
            base = state.config.public_url.rstrip("/") or str(request.base_url).rstrip("/")
            return f"{base}/v1/jobs/{info.id}/image"
        return state.storage.url(info.result["image_key"])  # a fresh presigned URL each time

    def find(job_id: str) -> JobInfo:
        try:
            return client.status(state.redis, job_id)
        except JobNotFound:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}") from None

    @router.post("/v1/jobs", status_code=202, response_model=JobResponse, tags=["jobs"],
                 summary="Submit an image generation job", responses=ERRORS)
    def create_job(
        body: JobRequest,  # type: ignore[valid-type]
        request: Request,
        response: Response,
        caller: str = Depends(authenticate),
        idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key", min_length=1,
                                                max_length=MAX_IDEMPOTENCY_KEY,
                                                description="Retrying with the same key returns the same job."),
    ) -> Any:
        fields = body.model_dump(exclude_none=True)
        request_fields = {k: v for k, v in fields.items() if k not in ("webhook", "webhook_events_filter")}
        try:
            generation = validate_request(request_fields, state.config.limits)
            subscription = None
            if "webhook" in fields or "webhook_events_filter" in fields:
                subscription = subscribe(fields.get("webhook"), fields.get("webhook_events_filter"),
                                         state.config.webhook)
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
                replayed = replay(idem_key, fingerprint, request, response)
                if replayed is not None:
                    return replayed
        try:  # the cap check and the enqueue are one atomic step (worker/admission.py)
            with state.queue.keeping_unreplicated(idem_key is not None):
                client.enqueue(state.queue, generation, job_id=job_id, options=state.config.job_options,
                               webhook=subscription)
        except (QueueFull, NotReplicated) as exc:
            if isinstance(exc, NotReplicated):  # with an Idempotency-Key the job stays: a retry gets it
                raise unconfirmed() from None
            if idem_key:
                state.redis.delete(idem_key)
            metrics.JOBS_REJECTED.labels(reason="queue_full").inc()
            raise ApiError(429, "queue_full", f"the queue holds {state.config.max_queued} jobs; retry later",
                           headers={"Retry-After": str(state.config.retry_after)}) from None
        metrics.JOBS_SUBMITTED.inc()
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return job_response(find(job_id), request)

    def unconfirmed() -> ApiError:
        return ApiError(503, "unavailable", "the job queue could not confirm the job on a replica; retry "
                        "(with the same Idempotency-Key to get the same job)",
                        headers={"Retry-After": str(state.config.retry_after)})

    def replay(idem_key: str, fingerprint: str, request: Request, response: Response) -> Any:
        """The job an earlier request with this key created; None if that job has expired."""
        deadline = time.monotonic() + 5
        while True:
            stored = json.loads(state.redis.get(idem_key) or "{}")
            if stored.get("fingerprint") not in (None, fingerprint):
                raise ApiError(409, "idempotency_conflict",
                               "this Idempotency-Key was used with a different request")
            try:
                info = client.status(state.redis, stored.get("job_id", ""))
                break
            except JobNotFound:
                if not stored or time.time() - stored.get("at", 0) > 10:
                    state.redis.delete(idem_key)  # the job it named has expired: start afresh
                    return None
                if time.monotonic() > deadline:  # the first request is still enqueueing
                    raise ApiError(409, "idempotency_conflict",
                                   "a request with this Idempotency-Key is still being processed") from None
                time.sleep(0.05)
        if not state.queue.replicated():  # the job may still be only on the master
            raise unconfirmed()
        response.headers["Location"] = f"/v1/jobs/{info.id}"
        response.headers["Idempotent-Replayed"] = "true"
        return job_response(info, request)

    @router.get("/v1/jobs/{job_id}", response_model=JobResponse, tags=["jobs"], summary="A job's status",
                responses=ERRORS)
    async def get_job(
        job_id: JobId,
        request: Request,
        caller: str = Depends(authenticate),
        wait: float = Query(0, ge=0, le=state.config.max_wait, allow_inf_nan=False,
                            description="Long poll: hold the request up to this many seconds until the job ends."),
    ) -> Any:
        deadline = time.monotonic() + wait
        while True:
            info = await anyio.to_thread.run_sync(find, job_id)
            if info.done or time.monotonic() >= deadline:
                return await anyio.to_thread.run_sync(job_response, info, request)
            await anyio.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))

    @router.post("/v1/jobs/{job_id}/cancel", response_model=JobResponse, tags=["jobs"], summary="Cancel a job",
                 responses=ERRORS)
    def cancel_job(job_id: JobId, request: Request, caller: str = Depends(authenticate)) -> Any:
        try:
            info = client.cancel(state.redis, job_id)
        except JobNotFound:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}") from None
        except JobNotCancelable as exc:
            raise ApiError(409, "already_finished", f"job {job_id} already {exc.info.status}") from None
        return job_response(info, request)

    @router.get("/v1/jobs/{job_id}/image", tags=["jobs"], summary="The job's PNG",
                responses={200: {"content": {"image/png": {}}}, 302: {"description": "Redirect to the image"},
                           **ERRORS})
    def get_image(job_id: JobId, caller: str = Depends(authenticate)) -> Response:
        info = find(job_id)
        if info.status != "succeeded" or not info.result:
            raise ApiError(409, "not_ready", f"job {job_id} is {info.status}; its image exists once it succeeded")
        key = info.result["image_key"]
        if isinstance(state.storage, LocalStorage):
            try:
                return Response(state.storage.get(key), media_type="image/png")
            except StorageError as exc:
                log.error("image of job %s missing from storage: %s", job_id, exc)
                raise ApiError(404, "image_missing", f"the image of job {job_id} is missing from storage") from None
        return RedirectResponse(state.storage.url(key), status_code=302)

    add_event_routes(router, state, authenticate, find, job_response)

    return router


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
