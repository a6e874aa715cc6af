"""OpenAI's Images API on the fleet: `POST /v1/images/generations` enqueues one job of `n` images
like `POST /v1/jobs`, waits for it (up to SD3SERVE_IMAGES_TIMEOUT, then 504 with the job id to
poll), and answers in OpenAI's shape; `GET /v1/models` names the served model. Errors here are
OpenAI's `{"error": {"message", "type", "param", "code"}}`.

No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and the request
model is built per app from its limits (a local name).
"""
import base64
import time
import uuid
from typing import Any, cast

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from api import job_views, submission
from api.auth import caller_dependency
from api.errors import ApiError
from api.openai_errors import OpenAIRoute, openai_error
from api.openai_schemas import ImagesResponse, Model, ModelList, OpenAIError, images_request_model
from api.state import ApiState
from engine.request import RequestLimits, RequestValidationError
from worker import contract
from worker.client import JobInfo
from worker.job_spec import ImageJob, validate_job

POLL_SECONDS = 0.1
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OpenAIError} for code in (400, 401, 403, 404, 409, 429, 504)}
_CLIENT_FAILURES = {"invalid_request", "too_large"}  # a worker's verdict on the request itself


def job_from_openai(fields: dict[str, Any], limits: RequestLimits) -> ImageJob:
    """An image job from an OpenAI request body (without `model`); `size` becomes width and height."""
    fields = dict(fields)
    size = fields.pop("size", "auto")
    for ignored in ("response_format", "user", "quality", "style"):
        fields.pop(ignored, None)
    if size != "auto":
        width, _, height = size.partition("x")
        fields["width"], fields["height"] = int(width), int(height)
    try:
        return validate_job(fields, limits)
    except RequestValidationError as exc:
        param = "size" if exc.field in ("width", "height") else exc.field
        raise ApiError(400, "invalid_value", f"{param}: {exc.message}" if param == "size" else str(exc),
                       field=param) from None


def build_openai_router(state: ApiState) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute)
    ImagesRequest = images_request_model(state.config.limits)
    authenticate = caller_dependency(state.config)
    served = state.config.served_model
    started = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": served, "object": "model", "created": started, "owned_by": "sd3serve"}

    @router.get("/v1/models", response_model=ModelList, tags=["openai"], summary="The served model",
                responses=ERRORS)
    def list_models(caller: str = Depends(authenticate)) -> Any:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model}", response_model=Model, tags=["openai"], summary="One model",
                responses=ERRORS)
    def get_model(model: str, caller: str = Depends(authenticate)) -> Any:
        if model != served:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist; this server serves {served!r}",
                           field="model")
        return model_card()

    @router.post("/v1/images/generations", response_model=ImagesResponse, tags=["openai"],
                 summary="Generate images (OpenAI's Images API)", responses=ERRORS)
    async def create_images(
        body: ImagesRequest,  # type: ignore[valid-type]
        request: Request,
        caller: str = Depends(authenticate),
    ) -> Any:
        fields = cast(BaseModel, body).model_dump(exclude_none=True)
        model = fields.pop("model", None)
        if model is not None and model != served:
            raise ApiError(404, "model_not_found", f"the model {model!r} does not exist; this server serves {served!r}",
                           field="model")
        spec = job_from_openai(fields, state.config.limits)
        job_id = uuid.uuid4().hex
        await anyio.to_thread.run_sync(submission.submit, state, spec, caller, job_id, fields.get("user"))
        info = await _wait(job_id, caller)
        if not info.done:
            return openai_error(
                504, f"the images are not ready after {state.config.images_timeout:g} s; the job goes on: "
                f"follow it at GET /v1/jobs/{job_id}", code="timeout", job_id=job_id,
                headers={"Location": f"/v1/jobs/{job_id}"})
        if info.status == contract.CANCELED:
            return openai_error(409, f"job {job_id} was canceled", code="canceled", job_id=job_id)
        if info.status == contract.FAILED:
            error = info.error or {"code": "worker_error", "message": "the job failed"}
            status = 400 if error["code"] in _CLIENT_FAILURES else 500
            return openai_error(status, error["message"], code=error["code"], job_id=job_id)
        data = await anyio.to_thread.run_sync(_image_data, info, fields["response_format"], request)
        g = spec.generation
        return {"created": int(time.time()), "data": data, "id": job_id, "output_format": spec.output_format,
                "size": f"{g.width}x{g.height}"}

    async def _wait(job_id: str, caller: str) -> JobInfo:
        deadline = time.monotonic() + state.config.images_timeout
        while True:
            info = await anyio.to_thread.run_sync(job_views.find, state, job_id, caller)
            if info.done or time.monotonic() >= deadline:
                return info
            await anyio.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))

    def _image_data(info: JobInfo, response_format: str, request: Request) -> list[dict[str, Any]]:
        seeds = [image["seed"] for image in (info.result or {}).get("images", [])] or [info.seed]
        if response_format == "url":
            urls = job_views.image_urls(state, info, request)
            return [{"url": url, "seed": seed} for url, seed in zip(urls, seeds)]
        return [{"b64_json": base64.b64encode(state.storage.get(key)).decode(), "seed": seed}
                for key, seed in zip(info.image_keys, seeds)]

    return router
