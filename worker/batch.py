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


class Phase(enum.Enum):
    RUNNING = "running"  # in the engine's batch
    STORING = "storing"  # image computed, upload under way (in a thread)
    SUCCEEDED = "succeeded"  # stored; RQ success handling still to do
    FAILED = "failed"  # RQ failure handling still to do


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
    request: GenerationRequest
    admitted_at: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.RUNNING
    upload: Future | None = None
    generate_seconds: float = 0.0
    result: dict[str, Any] | None = None
    failure: Failure | None = None
    finalizing: bool = False  # RQ's finalization was tried once (a retry must check the status first)
    reported_step: int = 0

    @property
    def job_id(self) -> str:
        return self.job.id

    def fail(self, code: str, message: str, retry: bool = False) -> None:
        self.phase = Phase.FAILED
        self.failure = Failure(code, message, retry)
