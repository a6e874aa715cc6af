"""The batching worker's admission: taking jobs from the queue without blocking while the engine
has free slots, registering each with RQ as started, and handing its images to the engine.

A mixin of `BatchWorker` (worker/batch_worker.py).
"""

from __future__ import annotations

import logging

from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import WorkerStatus

from engine.request import RequestValidationError
from worker import job_events, keys, metrics, rq_adapter, webhook_queue
from worker.batch import BatchEntry, Phase
from worker.bookkeeping import BatchBookkeeping
from worker.jobs import job_from_kwargs

log = logging.getLogger("sd3serve.worker")


class BatchAdmission(BatchBookkeeping):
    def _admit_more(self) -> None:
        if self._uploads is not None and self._uploads.spool_full:
            return  # storage is down and the spool is full: no new work until held images are stored
        slots = self.engine.admission_slots()
        while slots > 0:
            result = rq_adapter.dequeue_now(self)
            if result is None:
                return
            job, queue = result
            if not keys.is_generation(job):
                super().execute_job(job, queue)  # an ordinary RQ job: run it now, on its own
                self.set_state(WorkerStatus.BUSY)
                continue
            entry = self._admit(job, queue)
            if entry:
                slots -= len(entry.request_ids)  # one slot per image

    def _admit(self, job: Job, queue: Queue) -> BatchEntry | None:
        """Register `job` with RQ as started and hand its requests (one per image) to the engine."""
        execution = rq_adapter.start_execution(self, job)
        job.started_at = now()
        if job.retries_left is None and self.config.abandoned_retries:
            # A job enqueued without a Retry would be marked failed if this worker died; give it
            # retries so RQ's abandoned-job clean-up re-runs it instead.
            job.retries_left = self.config.abandoned_retries
            self.connection.hset(job.key, "retries_left", job.retries_left)
        entry = BatchEntry(job=job, queue=queue, execution=execution, request=None)  # type: ignore[arg-type]
        try:
            entry.spec = job_from_kwargs(job.id, job.args, job.kwargs, self.limits)
            entry.request = entry.spec.generation
            for request in entry.spec.image_requests(job.id):
                self.engine.add(request)
                entry.request_ids.append(request.request_id)
                entry.in_engine.add(request.request_id)
        except RequestValidationError as exc:
            entry.fail("invalid_request", str(exc))
        except ValueError as exc:  # e.g. larger than the attention-cache budget
            entry.fail("too_large", str(exc))
        self._entries[job.id] = entry
        if entry.phase is Phase.FAILED:
            for request_id in entry.request_ids:
                self.engine.cancel(request_id)
            self._finish_failure(entry)
            return None
        if job.enqueued_at:
            metrics.QUEUE_WAIT.observe(max((job.started_at - job.enqueued_at).total_seconds(), 0.0))
        job.meta.pop(keys.META_ERROR, None)
        job.meta.update(
            {
                keys.META_STEP: 0,
                keys.META_TOTAL: entry.request.steps,
                keys.META_SEED: entry.request.seed,
                keys.META_STATE: Phase.RUNNING.value,
            }
        )
        job.save_meta()
        job_events.announce(self.connection, job, job_events.STATUS)  # queued -> running
        webhook_queue.notify(self.connection, job, "start")
        log.info(
            "admitted job %s (%d x %dx%d, %d steps), %d in batch",
            job.id,
            len(entry.request_ids),
            entry.request.width,
            entry.request.height,
            entry.request.steps,
            len(self._entries),
        )
        return entry
