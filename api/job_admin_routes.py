"""The caller's own jobs: list them (newest first, paginated), delete one with its images, and
fetch a local image through its signed URL. Module-level handlers with their needs as FastAPI
dependencies (api/deps.py). (No `from __future__ import annotations`: FastAPI reads the
handlers' annotations.)"""

import logging
from typing import Any, Optional

from fastapi import APIRouter, Query, Request, Response
from rq.exceptions import InvalidJobOperation

from api import job_views
from api.auth import Caller
from api.deps import Jobs, State, Storage, Urls
from api.errors import ApiError
from api.schemas import ERRORS, ErrorResponse, JobId, JobList
from api.state import ApiState
from worker import client, keys
from worker.job_spec import CONTENT_TYPES, MAX_IMAGES, OUTPUT_FORMATS
from worker.signed_urls import BadImageUrl
from worker.storage import LocalStorage, StorageError

log = logging.getLogger("sd3serve.api")


def list_jobs(
    request: Request,
    state: State,
    jobs: Jobs,
    caller: Caller,
    limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
    cursor: Optional[str] = Query(
        None, max_length=40, pattern=r"^[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?$", description="next_cursor of the previous page."
    ),
) -> Any:
    page = jobs.page(caller, limit, cursor)
    data = []
    for job_id in page.job_ids:
        try:
            data.append(job_views.job_response(state, job_views.find(state, job_id, caller), request))
        except ApiError:  # expired between listing and reading
            continue
    return {"data": data, "next_cursor": page.next_cursor}


def delete_job(job_id: JobId, state: State, caller: Caller) -> Response:
    info = job_views.find(state, job_id, caller)
    job = client.fetch_job(state.redis, job_id)
    if not info.done:
        try:
            job.cancel()  # a running job leaves its batch at the next step
        except InvalidJobOperation:
            pass
    delete_images(state, info)
    job.delete()
    owner = info.owner or caller
    state.jobs.remove(owner, job_id)
    state.key_limits.release(owner, job_id)
    return Response(status_code=204)


def delete_images(state: ApiState, info: client.JobInfo) -> None:
    """The images the result names, and every name a running job could still store."""
    prefix = state.config.storage.key_prefix
    names = set(info.image_keys)
    n = min(int(info.request.get("n", 1) or 1), MAX_IMAGES)
    names |= {keys.image_key(prefix, info.id, i, fmt) for i in range(n) for fmt in OUTPUT_FORMATS}
    for key in sorted(names):
        try:
            state.storage.delete(key)
        except StorageError as exc:  # the lifecycle rule or the sweeper removes it later
            log.warning("could not delete image %s of job %s: %s", key, info.id, exc)


def get_file(
    key: str,
    storage: Storage,
    urls: Urls,
    expires: int = Query(..., ge=0, le=2**40),
    signature: str = Query(..., max_length=64, pattern="^[0-9a-f]{0,64}$"),
) -> Response:
    if not isinstance(storage, LocalStorage):
        raise ApiError(404, "not_found", "images are served by the object store (presigned URLs)")
    try:
        urls.verify(key, expires, signature)
    except BadImageUrl as exc:
        raise ApiError(403, exc.code, exc.message) from None
    try:
        data = storage.get(key)
    except StorageError as exc:
        log.error("image %s missing from storage: %s", key, exc)
        raise ApiError(404, "image_missing", "this image is not in storage (it may have expired)") from None
    extension = key.rsplit(".", 1)[-1]
    return Response(
        data,
        media_type=CONTENT_TYPES.get(extension, "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=300"},
    )


def build_job_admin_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route(
        "/v1/jobs",
        list_jobs,
        methods=["GET"],
        response_model=JobList,
        tags=["jobs"],
        summary="The caller's jobs, newest first",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/jobs/{job_id}",
        delete_job,
        methods=["DELETE"],
        status_code=204,
        tags=["jobs"],
        summary="Delete a job and its images",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/files/{key:path}",
        get_file,
        methods=["GET"],
        tags=["jobs"],
        summary="A local image, through its signed URL",
        responses={
            200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
            403: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
        },
    )
    return router
