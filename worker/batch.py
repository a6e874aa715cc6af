"""The batching worker's view of one job it is running (its RQ objects and where it stands), and
the state the worker's parts (batch_worker, batch_admission, batch_steps, bookkeeping) share."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.typing import EncodableT, FieldT
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker

from engine.request import GenerationRequest
from worker import contract
from worker.job_spec import ImageJob

if TYPE_CHECKING:
    from worker.config import WorkerConfig
    from worker.durable_upload import DurableUploader
    from worker.metrics import MetricsServer


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
    uploads: dict[int, Future] = field(default_factory=dict)  # image index -> DurableUploader.submit future
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


# The mixins below are parts of one `BatchWorker` (an RQ SimpleWorker): to the type checker they
# are SimpleWorkers with the attributes `BatchWorker.__init__` sets; at run time plain mixins.
if TYPE_CHECKING:
    _WorkerBase = SimpleWorker
else:
    _WorkerBase = object


class BatchWorkerState(_WorkerBase):
    config: "WorkerConfig"
    engine: Any  # an engine.engine.Engine (or a test double with its step API)
    storage: Any
    _entries: dict[str, BatchEntry]
    _uploads: "DurableUploader | None"
    _steps: int
    _step_records: list[dict[FieldT, EncodableT]]  # entries of the step-log stream
    _next_heartbeat: float
    _next_gpu_sample: float
    _stop_deadline: float | None
    metrics_server: "MetricsServer | None"
    deliverer: Any

    @property
    def limits(self) -> Any:
        return getattr(self.engine, "limits", self.config.engine.limits)
