"""Request and response bodies of the REST API.

The job request model is built from the deployment's `RequestLimits`, so the OpenAPI schema at
/docs shows the ranges this server really accepts. The engine's `validate_request` runs after
pydantic as the single source of truth for what a request means.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Optional

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, create_model

from api.field_types import list_of, one_of
from engine.request import CACHE_POLICIES, MAX_SEED, RequestLimits
from worker import contract
from worker.keys import JOB_ID_PATTERN
from worker.webhook_config import EVENTS
from worker.webhook_urls import MAX_URL_CHARS
from worker.job_spec import MAX_IMAGES, OUTPUT_FORMATS

JobState = contract.JobState  # one status vocabulary for the API, the client and the workers


def job_request_model(limits: RequestLimits) -> type[BaseModel]:
    # Strict: a string or a boolean is not a number (pydantic would take "64" and true), the same
    # rule as engine.request.validate_request. A float field still takes an integer.
    side: dict[str, Any] = dict(ge=limits.min_side, le=limits.max_side, multiple_of=limits.size_multiple, strict=True)
    return create_model(
        "JobRequest",
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"example": {"prompt": "a red circle on a blue background", "steps": 20, "seed": 7}}
        ),
        prompt=(
            str,
            Field(min_length=1, strict=True, max_length=limits.max_prompt_chars, pattern=r"\S", description="What to draw."),
        ),
        negative_prompt=(str, Field("", max_length=limits.max_prompt_chars, strict=True, description="What to avoid.")),
        width=(int, Field(limits.default_width, **side, description="Pixels.")),
        height=(int, Field(limits.default_height, **side, description="Pixels.")),
        steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps, strict=True, description="Denoising steps.")),
        guidance_scale=(
            float,
            Field(
                limits.default_guidance,
                ge=0,
                le=limits.max_guidance,
                allow_inf_nan=False,
                strict=True,
                description="Classifier-free guidance scale.",
            ),
        ),
        seed=(
            Optional[int],
            Field(None, ge=0, le=MAX_SEED, strict=True, description="Random seed; drawn at random when absent, always returned."),
        ),
        cache_interval=(
            int,
            Field(
                limits.default_cache_interval,
                ge=1,
                le=limits.max_cache_interval,
                strict=True,
                description="Quality knob: 1 computes every step exactly; K > 1 reuses "
                "cached attention for up to K-1 steps (faster).",
            ),
        ),
        cache_policy=(
            one_of(CACHE_POLICIES) | None,
            Field(None, description="How a cache_interval > 1 saves work; absent: the worker's default."),
        ),
        webhook=(
            Optional[str],
            Field(
                None,
                max_length=MAX_URL_CHARS,
                description="An http(s) URL POSTed the job's status (signed, Standard "
                "Webhooks) on the events of webhook_events_filter.",
            ),
        ),
        webhook_events_filter=(
            list_of(one_of(EVENTS)) | None,
            Field(
                None,
                min_length=1,
                description="Events that call the webhook: start, completed (succeeded, failed or canceled). Default: completed.",
            ),
        ),
        n=(int, Field(1, ge=1, le=MAX_IMAGES, description="Images to make; image i uses seed + i.")),
        output_format=(one_of(OUTPUT_FORMATS), Field("png", description="Image encoding.")),
        output_compression=(Optional[int], Field(None, ge=0, le=100, description="jpeg/webp quality, 0-100 (default 100).")),
    )


class Progress(BaseModel):
    step: int
    total: int


class WebhookStatus(BaseModel):
    event: Optional[str] = Field(None, description="The event of the latest delivery (start or completed).")
    attempts: int
    last_status: Optional[int | str] = Field(
        None, description="HTTP status of the last attempt, or timeout / connection_error / blocked."
    )
    delivered: bool
    gave_up: bool = False
    last_error: Optional[str] = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobResponse(BaseModel):
    id: str
    status: JobState
    queue_position: Optional[int] = Field(None, description="Jobs ahead of this one; null unless queued.")
    progress: Progress
    created_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    seed: Optional[int] = Field(None, description="The first image's seed; image i used seed + i.")
    n: int = Field(1, description="Images the job makes.")
    output_format: str = "png"
    request: dict[str, Any]
    image_url: Optional[str] = Field(None, description="Where the first image can be fetched, once succeeded.")
    images: list[str] = Field(default_factory=list, description="Every image's URL, in seed order.")
    timings: Optional[dict[str, float]] = None
    error: Optional[ErrorDetail] = None
    webhook: Optional[WebhookStatus] = Field(None, description="Delivery state, when the job has a webhook.")


class JobList(BaseModel):
    data: list[JobResponse]
    next_cursor: Optional[str] = Field(None, description="Pass as ?cursor= for the next (older) page; null: no more.")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 429, 503)}
# RQ ids (uuid4, with or without dashes) and ids given to `client.submit`; no ':' (RQ reads
# '<job>:<execution>' as an execution of <job>, which would give a job aliases).
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="A job id as POST /v1/jobs returned it.")]
