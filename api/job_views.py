"""A job as the REST API shows it, with URLs for its images, and looking jobs up for a caller."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from api.errors import ApiError
from api.ownership import visible_to
from api.schemas import JobResponse
from api.state import ApiState
from worker import client, contract, job_view
from worker.client import JobInfo, JobNotFound
from worker.storage import LocalStorage


def find(state: ApiState, job_id: str, caller: str) -> JobInfo:
    """The caller's job; 404 for a job that does not exist and for another key's job alike."""
    try:
        info = client.status(state.redis, job_id)
    except JobNotFound:
        info = None
    if info is None or not visible_to(info, caller):
        raise ApiError(404, "not_found", f"no job with id {job_id!r}")
    return info


def base_url(state: ApiState, request: Request) -> str:
    return state.config.public_url.rstrip("/") or str(request.base_url).rstrip("/")


def image_urls(state: ApiState, info: JobInfo, request: Request) -> list[str]:
    """Where each image can be fetched: signed, expiring URLs (local storage) or presigned S3 URLs."""
    if isinstance(state.storage, LocalStorage):
        base = base_url(state, request)
        return [state.urls.url(base, key) for key in info.image_keys]
    return [state.storage.url(key) for key in info.image_keys]  # fresh presigned URLs each time


def job_response(state: ApiState, info: JobInfo, request: Request) -> dict[str, Any]:
    urls = image_urls(state, info, request) if info.status == contract.SUCCEEDED and info.result else []
    return JobResponse.model_validate(job_view.status_body(info, urls)).model_dump(mode="json")
