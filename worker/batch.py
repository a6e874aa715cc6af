"""The batching worker's view of one job it is running: its RQ objects and where it stands."""
from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue

from engine.request import GenerationRequest
from worker import contract
from worker.job_spec import ImageJob


class Phase(enum.Enum):
    RUNNING = contract.META_RUNNING  # in the engine's batch
    STORING = contract.META_STORING  # every image computed, uploads under way (in threads)
    SUCCEEDED = contract.SUCCEEDED  # stored; RQ success handling still to do
    FAILED = contract.FAILED  # RQ failure handling still to do


@dataclass
class Failure:
    code: str
    message: str
    retry: bool  # let RQ's Retry re-run the job (True) or fail it for good (False)


@dataclass
class BatchEntry:
    job: Job
    queue: Queue
    execution: Execution
    request: GenerationRequest  # the job's request (its first image's seed); None until validated
    spec: ImageJob | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.RUNNING
    request_ids: list[str] = field(default_factory=list)  # the engine requests, one per image
    in_engine: set[str] = field(default_factory=set)  # those not finished yet
    uploads: dict[int, Future] = field(default_factory=dict)  # image index -> store_image future
    generate_seconds: float = 0.0
    result: dict[str, Any] | None = None
    failure: Failure | None = None
    finalizing: bool = False  # RQ's finalization was tried once (a retry must check the status first)
    reported_step: int = 0

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def upload(self) -> Future | None:
        """An upload still under way (None when all are done)."""
        return next((f for f in self.uploads.values() if not f.done()), None)

    def fail(self, code: str, message: str, retry: bool = False) -> None:
        self.phase = Phase.FAILED
        self.failure = Failure(code, message, retry)
