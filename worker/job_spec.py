"""An image job: one generation request, how many images of it (`n`) and how they are encoded.

Pure Python (no torch), shared by the API, the Python client and the workers. The job's `n`
images are `n` engine requests that differ only in their seed (seed, seed+1, ... seed+n-1) and
their request id (`<job_id>/<i>`): they run as rows of the same step-level batch and share one
prompt encoding (the engine's prompt cache is keyed by text).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from engine.request import MAX_SEED, GenerationRequest, RequestLimits, RequestValidationError, validate_request

MAX_IMAGES = 10
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JOB_FIELDS = ("n", "output_format", "output_compression")
DEFAULT_COMPRESSION = 100  # jpeg/webp quality when none is asked for (OpenAI's default too)
REQUEST_ID_SEPARATOR = "/"  # RQ job ids never contain it


@dataclass(frozen=True)
class ImageJob:
    generation: GenerationRequest
    n: int = 1
    output_format: str = "png"
    output_compression: int | None = None  # jpeg/webp only, 0-100 (quality)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def seeds(self) -> list[int]:
        return [self.generation.seed + i for i in range(self.n)]

    def job_kwargs(self) -> dict[str, Any]:
        """The RQ job's keyword arguments: the request, plus the job fields that differ from default."""
        kwargs = {k: v for k, v in self.generation.to_dict().items() if k != "request_id" and v is not None}
        if self.n != 1:
            kwargs["n"] = self.n
        if self.output_format != "png":
            kwargs["output_format"] = self.output_format
        if self.output_compression is not None:
            kwargs["output_compression"] = self.output_compression
        return kwargs

    def image_requests(self, job_id: str) -> list[GenerationRequest]:
        """The engine requests of this job, image i with seed + i and id `<job_id>/<i>`."""
        return [replace(self.generation, seed=seed, request_id=image_request_id(job_id, i)) for i, seed in enumerate(self.seeds)]


def image_request_id(job_id: str, index: int) -> str:
    return f"{job_id}{REQUEST_ID_SEPARATOR}{index}"


def split_request_id(request_id: str) -> tuple[str, int]:
    """(job id, image index) of an engine request id made by `image_request_id`."""
    job_id, _, index = request_id.rpartition(REQUEST_ID_SEPARATOR)
    if not job_id or not index.isdigit():
        return request_id, 0
    return job_id, int(index)


def _job_int(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestValidationError(name, f"must be an integer, got {value!r}")
    return value


def validate_job(data: Mapping[str, Any], limits: RequestLimits = RequestLimits()) -> ImageJob:
    """Check a job's fields (the request's and n / output_format / output_compression)."""
    if not isinstance(data, Mapping):
        raise RequestValidationError("request", "must be a JSON object")
    n = _job_int(data, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        raise RequestValidationError("n", f"must be between 1 and {MAX_IMAGES}, got {n}")
    output_format = data.get("output_format")
    output_format = "png" if output_format is None else output_format
    if output_format not in OUTPUT_FORMATS:
        raise RequestValidationError("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    compression = _job_int(data, "output_compression")
    if compression is not None:
        if not 0 <= compression <= 100:
            raise RequestValidationError("output_compression", f"must be between 0 and 100, got {compression}")
        if output_format == "png":
            raise RequestValidationError("output_compression", "applies to jpeg and webp only (png is lossless)")
    generation = validate_request({k: v for k, v in data.items() if k not in JOB_FIELDS}, limits)
    if generation.seed + n - 1 > MAX_SEED:
        if data.get("seed") is None:  # a drawn seed: draw it lower
            return ImageJob(replace(generation, seed=generation.seed - n), n, output_format, compression)
        raise RequestValidationError("seed", f"seed + n - 1 must be at most {MAX_SEED} (image i uses seed + i)")
    return ImageJob(generation, n, output_format, compression)
