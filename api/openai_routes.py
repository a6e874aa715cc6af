"""OpenAI's Images API on the fleet: `POST /v1/images/generations` enqueues one job of `n` images
like `POST /v1/jobs`, waits for it (up to SD3SERVE_IMAGES_TIMEOUT, then 504 with the job id to
poll), and answers in OpenAI's shape; `GET /v1/models` names the served model. Errors here are
OpenAI's `{"error": {"message", "type", "param", "code"}}`.

Module-level handlers with their needs as FastAPI dependencies (api/deps.py). No
`from __future__ import annotations`: FastAPI reads the handlers' annotations.
"""

import base64
import time
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel

from api import job_views, long_poll, submission
from api.auth import Caller
from api.deps import State
from api.endpoint import specialize
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
        raise ApiError(400, "invalid_value", f"{param}: {exc.message}" if param == "size" else str(exc), field=param) from None


def model_card(state: ApiState) -> dict[str, Any]:
    return {"id": state.config.served_model, "object": "model", "created": state.started, "owned_by": "sd3serve"}


def list_models(state: State, caller: Caller) -> Any:
    return {"object": "list", "data": [model_card(state)]}


def get_model(model: str, state: State, caller: Caller) -> Any:
    served = state.config.served_model
    if model != served:
        raise ApiError(
            404, "model_not_found", f"the model {model!r} does not exist; this server serves {served!r}", field="model"
        )
    return model_card(state)


async def create_images(
    body: BaseModel,  # the app's ImageGenerationRequest (api.openai_schemas.images_request_model), set by the router
    request: Request,
    state: State,
    caller: Caller,
) -> Any:
    fields = body.model_dump(exclude_none=True)
    model = fields.pop("model", None)
    served = state.config.served_model
    if model is not None and model != served:
        raise ApiError(
            404, "model_not_found", f"the model {model!r} does not exist; this server serves {served!r}", field="model"
        )
    spec = job_from_openai(fields, state.config.limits)
    job_id = uuid.uuid4().hex
    await anyio.to_thread.run_sync(submission.submit, state, spec, caller, job_id, fields.get("user"))
    info = await long_poll.until_done(state, job_id, caller, state.config.images_timeout, request, poll=POLL_SECONDS)
    if not info.done:
        return openai_error(
            504,
            f"the images are not ready after {state.config.images_timeout:g} s; the job goes on: "
            f"follow it at GET /v1/jobs/{job_id}",
            code="timeout",
            job_id=job_id,
            headers={"Location": f"/v1/jobs/{job_id}"},
        )
    if info.status == contract.CANCELED:
        return openai_error(409, f"job {job_id} was canceled", code="canceled", job_id=job_id)
    if info.status == contract.FAILED:
        error = info.error or {"code": "worker_error", "message": "the job failed"}
        status = 400 if error["code"] in _CLIENT_FAILURES else 500
        return openai_error(status, error["message"], code=error["code"], job_id=job_id)
    data = await anyio.to_thread.run_sync(image_data, state, info, fields["response_format"], request)
    g = spec.generation
    return {
        "created": int(time.time()),
        "data": data,
        "id": job_id,
        "output_format": spec.output_format,
        "size": f"{g.width}x{g.height}",
    }


def image_data(state: ApiState, info: JobInfo, response_format: str, request: Request) -> list[dict[str, Any]]:
    seeds = [image["seed"] for image in (info.result or {}).get("images", [])] or [info.seed]
    if response_format == "url":
        urls = job_views.image_urls(state, info, request)
        return [{"url": url, "seed": seed} for url, seed in zip(urls, seeds)]
    return [
        {"b64_json": base64.b64encode(state.storage.get(key)).decode(), "seed": seed} for key, seed in zip(info.image_keys, seeds)
    ]


def build_openai_router(limits: RequestLimits) -> APIRouter:
    """The OpenAI routes; `limits` shapes only the request model (and so the schema)."""
    router = APIRouter(route_class=OpenAIRoute)
    router.add_api_route(
        "/v1/models",
        list_models,
        methods=["GET"],
        response_model=ModelList,
        tags=["openai"],
        summary="The served model",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/models/{model}",
        get_model,
        methods=["GET"],
        response_model=Model,
        tags=["openai"],
        summary="One model",
        responses=ERRORS,
    )
    router.add_api_route(
        "/v1/images/generations",
        specialize(create_images, body=images_request_model(limits)),
        methods=["POST"],
        response_model=ImagesResponse,
        tags=["openai"],
        summary="Generate images (OpenAI's Images API)",
        responses=ERRORS,
    )
    return router
