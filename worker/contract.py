"""The job contract shared by the API, the Python client and the workers.

One status vocabulary, what a job's meta holds while it runs (its progress), and the result a
succeeded job stores in Redis (`job.return_value()`). The JSON a result serialises to is the
one workers have always stored, so jobs finished by older workers read the same (a result from
before `images` existed has only `image_key` / `image_url`). Torch-free: the API imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, Mapping, TypedDict, get_args

from rq.job import JobStatus

# -- status ---------------------------------------------------------------------------------------
JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]
QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELED: Final = "canceled"
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
TERMINAL: frozenset[JobState] = frozenset({SUCCEEDED, FAILED, CANCELED})

_FROM_RQ: dict[JobStatus, JobState] = {
    JobStatus.QUEUED: QUEUED,
    JobStatus.DEFERRED: QUEUED,
    JobStatus.SCHEDULED: QUEUED,  # waiting to be retried
    JobStatus.CREATED: QUEUED,
    JobStatus.STARTED: RUNNING,
    JobStatus.FINISHED: SUCCEEDED,
    JobStatus.FAILED: FAILED,
    JobStatus.STOPPED: FAILED,
    JobStatus.CANCELED: CANCELED,
}


def state_of(rq_status: JobStatus | None) -> JobState:
    """The sd3serve status of an RQ job status (anything unknown reads as queued)."""
    return _FROM_RQ.get(rq_status, QUEUED) if rq_status is not None else QUEUED


# -- meta while a job runs ------------------------------------------------------------------------
# What a batching worker writes to job.meta["state"] (worker.keys.META_STATE): the job is in the
# engine's batch, its images are being uploaded, they are stored, or it went back to the queue.
WorkerPhase = Literal["running", "storing", "stored", "requeued"]
META_RUNNING: Final = "running"
META_STORING: Final = "storing"
META_STORED: Final = "stored"
META_REQUEUED: Final = "requeued"


class Progress(TypedDict):
    step: int
    total: int


class JobError(TypedDict):
    code: str
    message: str


# -- the result of a succeeded job ----------------------------------------------------------------
@dataclass(frozen=True)
class ResultImage:
    key: str  # the storage key
    url: str  # the worker's URL of it (presigned for S3, file:// for a local folder)
    seed: int
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "url": self.url, "seed": self.seed, "index": self.index}


@dataclass(frozen=True)
class JobResult:
    """What `job.return_value()` holds for a succeeded job; `to_dict()` is the stored JSON."""

    images: tuple[ResultImage, ...]  # in index (seed) order
    n: int
    output_format: str
    content_type: str
    seed: int | None
    width: int
    height: int
    steps: int
    cache_interval: int
    timings: dict[str, float] = field(default_factory=dict)  # queue/generate/store/total seconds, when known
    storage_tries: int = 0
    worker: str = ""

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("a succeeded job has at least one image")

    def to_dict(self) -> dict[str, Any]:
        first = self.images[0]
        return {
            "image_key": first.key,
            "image_url": first.url,
            "images": [image.to_dict() for image in self.images],
            "n": self.n,
            "output_format": self.output_format,
            "content_type": self.content_type,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "cache_interval": self.cache_interval,
            "timings": dict(self.timings),
            "storage_tries": self.storage_tries,
            "worker": self.worker,
        }


def result_image_keys(result: Mapping[str, Any] | None) -> list[str]:
    """Storage keys of a stored result's images, in seed order (older results: the one image_key)."""
    result = result or {}
    if "images" in result:
        return [image["key"] for image in result["images"]]
    return [result["image_key"]] if "image_key" in result else []


def result_image_urls(result: Mapping[str, Any] | None) -> list[str]:
    """The workers' URLs of a stored result's images (older results: the one image_url)."""
    result = result or {}
    if "images" in result:
        return [image["url"] for image in result["images"]]
    return [result["image_url"]] if "image_url" in result else []
