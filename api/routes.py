"""The REST endpoints. Handlers are thin: validation, then `worker.client` against Redis.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and the
job request model is built per app from its limits (a local name, not a module global).
"""
import hashlib
import json
import logging
import time
import uuid
from typing import Any, Optional, cast

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel

from api import job_views, metrics, submission
from api.auth import caller_dependency
from api.errors import ApiError
from api.schemas import ERRORS, JobId, JobResponse
from api.state import ApiState
from engine.request import RequestValidationError
from worker import client, contract, keys
from worker.admission import NotReplicated
from worker.client import JobInfo, JobNotCancelable, JobNotFound
from worker.job_spec import CONTENT_TYPES, validate_job
from worker.storage import LocalStorage, StorageError
from worker.webhook_subscription import subscribe
from api.events import add_event_routes

log = logging.getLogger("sd3serve.api")
MAX_IDEMPOTENCY_KEY = 255


def build_router(state: ApiState) -> APIRouter:
    router = APIRouter()
    JobRequest = state.job_request
    authenticate = caller_dependency(state.config)

    def job_response(info: JobInfo, request: Request) -> dict[str, Any]:
        return job_views.job_response(state, info, request)

    def find(job_id: str, caller: str) -> JobInfo:
        return job_views.find(state, job_id, caller)

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
        fields = cast(BaseModel, body).model_dump(exclude_none=True)
        request_fields = {k: v for k, v in fields.items() if k not in ("webhook", "webhook_events_filter")}
        try:
            spec = validate_job(request_fields, state.config.limits)
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
        try:  # per-key limits, then the cap check and the enqueue as one atomic step (worker/admission.py)
            with state.queue.keeping_unreplicated(idem_key is not None):
                submission.submit(state, spec, caller, job_id, webhook=subscription)
        except NotReplicated:  # with an Idempotency-Key the job stays: a retry gets it
            raise unconfirmed() from None
        except ApiError:
            if idem_key:
                state.redis.delete(idem_key)
            raise
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return job_response(find(job_id, caller), request)

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
            info = await anyio.to_thread.run_sync(find, job_id, caller)
            if info.done or time.monotonic() >= deadline:
                return await anyio.to_thread.run_sync(job_response, info, request)
            await anyio.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))

    @router.post("/v1/jobs/{job_id}/cancel", response_model=JobResponse, tags=["jobs"], summary="Cancel a job",
                 responses=ERRORS)
    def cancel_job(job_id: JobId, request: Request, caller: str = Depends(authenticate)) -> Any:
        find(job_id, caller)  # another key's job is not found
        try:
            info = client.cancel(state.redis, job_id)
        except JobNotFound:
            raise ApiError(404, "not_found", f"no job with id {job_id!r}") from None
        except JobNotCancelable as exc:
            raise ApiError(409, "already_finished", f"job {job_id} already {exc.info.status}") from None
        return job_response(info, request)

    @router.get("/v1/jobs/{job_id}/image", tags=["jobs"], summary="One of the job's images",
                responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
                           302: {"description": "Redirect to the image"}, **ERRORS})
    def get_image(job_id: JobId, caller: str = Depends(authenticate),
                  index: int = Query(0, ge=0, le=99, description="Which image: 0 to n-1.")) -> Response:
        info = find(job_id, caller)
        if info.status != contract.SUCCEEDED or not info.result:
            raise ApiError(409, "not_ready", f"job {job_id} is {info.status}; its image exists once it succeeded")
        image_keys = info.image_keys
        if index >= len(image_keys):
            raise ApiError(404, "not_found", f"job {job_id} has {len(image_keys)} images (index 0 to "
                           f"{len(image_keys) - 1})", field="index")
        key = image_keys[index]
        if isinstance(state.storage, LocalStorage):
            try:
                return Response(state.storage.get(key), media_type=info.result.get("content_type", "image/png"))
            except StorageError as exc:
                log.error("image of job %s missing from storage: %s", job_id, exc)
                raise ApiError(404, "image_missing", f"the image of job {job_id} is missing from storage") from None
        return RedirectResponse(state.storage.url(key), status_code=302)

    add_event_routes(router, state, authenticate, find, job_response)

    return router

