"""The REST endpoints. Handlers are thin: validation, then `worker.client` against Redis.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and the
job request model is built per app from its limits (a local name, not a module global).
"""
import hashlib
import json
import time
import uuid
from typing import Any, Optional

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from api import job_views, metrics, submission
from api.auth import caller_dependency
from api.errors import ApiError
from api.schemas import ErrorResponse, Health, JobResponse
from api.state import ApiState
from engine.request import RequestValidationError
from worker import client, keys
from worker.client import JobInfo, JobNotCancelable, JobNotFound
from worker.job_spec import CONTENT_TYPES, validate_job
from worker.storage import LocalStorage, StorageError

MAX_IDEMPOTENCY_KEY = 255
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 429)}


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
        idempotency_key: Optional[str] = Header(None, alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
                                                description="Retrying with the same key returns the same job."),
    ) -> Any:
        fields = body.model_dump(exclude_none=True)
        try:
            spec = validate_job(fields, state.config.limits)
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
        try:
            submission.submit(state, spec, caller, job_id)  # per-key limits, queue cap, enqueue
        except ApiError:
            if idem_key:
                state.redis.delete(idem_key)
            raise
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return job_response(find(job_id, caller), request)

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
        response.headers["Location"] = f"/v1/jobs/{info.id}"
        response.headers["Idempotent-Replayed"] = "true"
        return job_response(info, request)

    @router.get("/v1/jobs/{job_id}", response_model=JobResponse, tags=["jobs"], summary="A job's status",
                responses=ERRORS)
    async def get_job(
        job_id: str,
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
    def cancel_job(job_id: str, request: Request, caller: str = Depends(authenticate)) -> Any:
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
    def get_image(job_id: str, caller: str = Depends(authenticate),
                  index: int = Query(0, ge=0, le=99, description="Which image: 0 to n-1.")) -> Response:
        info = find(job_id, caller)
        if info.status != "succeeded" or not info.result:
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
                raise ApiError(404, "image_missing", str(exc)) from None
        return RedirectResponse(state.storage.url(key), status_code=302)

    @router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
    def healthz() -> Any:
        return {"status": "ok", "checks": {}}

    @router.get("/readyz", response_model=Health, tags=["health"], summary="Redis and storage are reachable",
                responses={503: {"model": Health}})
    def readyz() -> Any:
        checks = {}
        try:
            state.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable: {exc}"
        try:
            state.storage.check()
            checks["storage"] = "ok"
        except Exception as exc:
            checks["storage"] = f"unreachable: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)

    @router.get("/metrics", tags=["health"], summary="Prometheus metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        body, content_type = metrics.render_metrics()
        return Response(body, media_type=content_type)

    return router

