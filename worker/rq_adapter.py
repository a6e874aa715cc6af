"""Every use of RQ internals by the batching worker, in one place.

`BatchWorker` registers and ends many jobs itself, the way RQ's own `execute_job` does for one,
so it calls methods RQ does not document as public (`_finalize_success`, `_finalize_failure`,
`prepare_execution`, ...) and reads a few private attributes. They are wrapped here, and
`contract_problems` checks that the installed RQ still has each with the parameters we pass:
tests/test_rq_adapter.py fails loudly when an RQ upgrade changes one, and `require_contract`
refuses to start a worker on such an RQ.
"""

from __future__ import annotations

import inspect
from types import TracebackType
from typing import Any

import rq
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.worker import SimpleWorker

ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]

# (owner, method) -> the parameters we pass it, in order (self excluded).
METHODS: dict[tuple[type, str], tuple[str, ...]] = {
    (SimpleWorker, "_finalize_success"): ("job", "queue", "execution", "return_value"),
    (SimpleWorker, "_finalize_failure"): ("job", "queue", "execution", "exc_info"),
    (SimpleWorker, "prepare_execution"): ("job",),
    (SimpleWorker, "prepare_job_execution"): ("job", "remove_from_intermediate_queue"),
    (SimpleWorker, "cleanup_execution"): ("job", "pipeline", "execution"),
    (SimpleWorker, "dequeue_job_and_maintain_ttl"): ("timeout", "max_idle_time"),
    (SimpleWorker, "_install_signal_handlers"): (),
    (Queue, "dequeue_any"): ("queues", "timeout", "connection", "job_class", "serializer", "death_penalty_class"),
    (Queue, "release_maintenance_lock"): (),
    (IntermediateQueue, "cleanup"): ("worker", "queue"),
    (Execution, "heartbeat"): ("started_job_registry", "ttl", "pipeline"),
    (Job, "heartbeat"): ("timestamp", "ttl", "pipeline", "xx"),
}
# Instance attributes a worker sets in its __init__, read by us.
WORKER_ATTRIBUTES = ("_stop_requested", "_ordered_queues", "_exc_handlers")


def contract_problems(worker: Any = None) -> list[str]:
    """What the installed RQ lacks of what we use (empty: all there). With `worker` (a worker
    instance) its private attributes are checked too."""
    problems = []
    for (owner, name), wanted in METHODS.items():
        method = getattr(owner, name, None)
        if method is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            continue
        params = [p for p in inspect.signature(method).parameters if p != "self"]
        if tuple(params[: len(wanted)]) != wanted:
            problems.append(f"{owner.__name__}.{name} takes {tuple(params)}, we pass {wanted}")
    for name in WORKER_ATTRIBUTES if worker is not None else ():
        if not hasattr(worker, name):
            problems.append(f"workers have no attribute {name}")
    return problems


def require_contract(worker: Any = None) -> None:
    problems = contract_problems(worker)
    if problems:
        raise RuntimeError(f"RQ {rq.__version__} changed what worker.BatchWorker relies on: " + "; ".join(problems))


def start_execution(worker: SimpleWorker, job: Job) -> Execution:
    """Register `job` as started by `worker` (an Execution in the StartedJobRegistry, status
    STARTED, out of the intermediate queue), as RQ's `execute_job` does."""
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return execution


def finalize_success(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution, result: Any) -> None:
    worker._finalize_success(job, queue, execution, result)


def finalize_failure(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution, exc_info: ExcInfo) -> None:
    worker._finalize_failure(job, queue, execution, exc_info)


def stop_requested(worker: SimpleWorker) -> bool:
    return bool(worker._stop_requested)


def dequeue_now(worker: SimpleWorker) -> tuple[Job, Queue] | None:
    """The next job of the worker's queues without blocking (`dequeue_any` with no timeout), or None."""
    return worker.queue_class.dequeue_any(
        worker._ordered_queues,
        None,
        connection=worker.connection,
        job_class=worker.job_class,
        serializer=worker.serializer,
        death_penalty_class=worker.death_penalty_class,
    )


def clean_queue(worker: SimpleWorker, queue: Queue) -> None:
    """RQ's registry clean-up for `queue` (the caller holds its maintenance lock, released here)."""
    from rq import worker_registration

    try:
        clean_registries(queue, worker._exc_handlers)
        worker_registration.clean_worker_registry(queue)
        queue.intermediate_queue.cleanup(worker, queue)
    finally:
        queue.release_maintenance_lock()
