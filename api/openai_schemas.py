"""Request and response bodies of the OpenAI-compatible routes (`/v1/images/generations`, `/v1/models`),
built from the deployment's limits like the native job request."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from api.field_types import one_of
from engine.request import CACHE_POLICIES, MAX_SEED, RequestLimits
from worker.job_spec import MAX_IMAGES, OUTPUT_FORMATS

SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
RESPONSE_FORMATS = ("url", "b64_json")
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")  # OpenAI's words, accepted
STYLES = ("vivid", "natural")


def images_request_model(limits: RequestLimits) -> type[BaseModel]:
    return create_model(
        "ImageGenerationRequest",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={
                "example": {
                    "model": "sd3-shapes",
                    "prompt": "a red circle on a blue background",
                    "n": 2,
                    "size": "128x128",
                    "response_format": "b64_json",
                }
            },
        ),
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars, pattern=r"\S", description="What to draw.")),
        model=(Optional[str], Field(None, max_length=200, description="The served model (GET /v1/models); absent: it.")),
        n=(int, Field(1, ge=1, le=MAX_IMAGES, description="Images to make; image i uses seed + i.")),
        size=(
            str,
            Field(
                "auto",
                pattern=SIZE_PATTERN,
                description=(
                    f"'WIDTHxHEIGHT', each {limits.min_side}-{limits.max_side} and a multiple of {limits.size_multiple}; "
                    f"'auto': {limits.default_width}x{limits.default_height}."
                ),
            ),
        ),
        response_format=(one_of(RESPONSE_FORMATS), Field("url", description="URLs or base64 image bytes.")),
        output_format=(one_of(OUTPUT_FORMATS), Field("png")),
        output_compression=(Optional[int], Field(None, ge=0, le=100, description="jpeg/webp quality (default 100).")),
        user=(Optional[str], Field(None, max_length=256, description="Your end user's id, kept with the job.")),
        quality=(one_of(QUALITIES) | None, Field(None, description="Accepted for compatibility; steps set the quality here.")),
        style=(one_of(STYLES) | None, Field(None, description="Accepted for compatibility; no effect.")),
        negative_prompt=(str, Field("", max_length=limits.max_prompt_chars, description="What to avoid.")),
        steps=(Optional[int], Field(None, ge=1, le=limits.max_steps, description="Denoising steps.")),
        guidance_scale=(Optional[float], Field(None, ge=0, le=limits.max_guidance, allow_inf_nan=False)),
        seed=(Optional[int], Field(None, ge=0, le=MAX_SEED, description="The first image's seed; random if absent.")),
        cache_interval=(
            Optional[int],
            Field(
                None,
                ge=1,
                le=limits.max_cache_interval,
                description="1 = exact; 2 and 3: the ~1.6x and ~2x caching presets; other K: the worker's policy at interval K.",
            ),
        ),
        cache_policy=(one_of(CACHE_POLICIES) | None, Field(None)),
    )


class ImageData(BaseModel):
    url: Optional[str] = None
    b64_json: Optional[str] = None
    revised_prompt: Optional[str] = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    id: str = Field(description="The sd3serve job id (GET /v1/jobs/{id}).")
    output_format: str
    size: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
    job_id: Optional[str] = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
