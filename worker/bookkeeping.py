"""The batching worker's Redis side: heartbeats, cancellations, progress, the step log, and
ending jobs through RQ's own success/failure handling (or giving them back to the queue).

A mixin of `BatchWorker`; every method may raise a Redis connection error, after which the
worker retries the whole sync on its next iteration, so each is safe to repeat.
"""

from __future__ import annotations

import logging
import sys
import time

import redis
from rq.job import JobStatus
from rq.utils import as_text, now

from worker import contract, job_events, keys, metrics, rq_adapter, webhook_queue
from worker.batch import BatchEntry, BatchWorkerState, Phase

log = logging.getLogger("sd3serve.worker")


class GenerationError(RuntimeError):
    """Recorded as the failure of a job the engine or storage could not complete."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class BatchBookkeeping(BatchWorkerState):
    def _heartbeat_if_due(self) -> None:
        if time.monotonic() < self._next_heartbeat:
            return
        ttl = self.config.heartbeat_ttl
        with self.connection.pipeline() as pipe:
            self.heartbeat(max(self.worker_ttl, ttl) + 60, pipeline=pipe)
            stamp = now()
            for entry in self._entries.values():
                entry.execution.heartbeat(entry.job.started_job_registry, ttl, pipeline=pipe)
                entry.job.heartbeat(stamp, ttl, pipeline=pipe, xx=True)
            pipe.execute()
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_interval

    def _drop_canceled(self) -> None:
        """Jobs canceled (or deleted, or handed to another worker) leave the batch now."""
        entries = list(self._entries.values())
        if not entries:
            return
        with self.connection.pipeline() as pipe:
            for entry in entries:
                pipe.hmget(entry.job.key, "status", "worker_name")
            states = pipe.execute()
        for entry, (status, worker_name) in zip(entries, states):
            status = as_text(status) if status else None
            if entry.finalizing and status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.QUEUED, JobStatus.SCHEDULED):
                self._entries.pop(entry.job_id, None)  # an earlier finalization got through
                continue
            if status == JobStatus.STARTED and as_text(worker_name or b"") == self.name:
                continue
            for request_id in entry.request_ids:
                self.engine.cancel(request_id)
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(entry.job, pipeline=pipe, execution=entry.execution)
                pipe.execute()
            self._entries.pop(entry.job_id, None)
            if status == JobStatus.CANCELED or status is None:
                job_events.announce(self.connection, entry.job, job_events.STATUS)
                webhook_queue.notify(self.connection, entry.job, "completed")  # queued once, whoever canceled
                metrics.JOBS_COMPLETED.labels(status=contract.CANCELED).inc()
                log.info("job %s canceled; it left the batch", entry.job_id)
            else:
                log.warning("job %s is %s elsewhere; dropped from this batch", entry.job_id, status)

    def _enforce_timeouts(self) -> None:
        for entry in self._entries.values():
            timeout = entry.job.timeout
            if entry.phase is Phase.RUNNING and timeout and timeout > 0:
                if time.monotonic() - entry.admitted_at > timeout:
                    for request_id in entry.request_ids:
                        self.engine.cancel(request_id)
                    entry.fail("timeout", f"the job ran longer than its timeout of {timeout} s")

    def _write_progress(self) -> None:
        """job.meta: step/total every `progress_every` steps, and "storing" once the image is made."""
        due = self._steps % self.config.progress_every == 0
        size = len(self.engine.running_ids())
        changed = []
        for entry in self._entries.values():
            meta = entry.job.meta
            if entry.phase is Phase.STORING and meta.get(keys.META_STATE) != Phase.STORING.value:
                meta.update({keys.META_STEP: entry.request.steps, keys.META_STATE: Phase.STORING.value})
                changed.append(entry)
            elif due and entry.phase is Phase.RUNNING:
                progress = self._job_progress(entry)
                if progress and progress[0] != entry.reported_step:
                    entry.reported_step = progress[0]
                    meta.update({keys.META_STEP: progress[0], keys.META_TOTAL: progress[1], keys.META_BATCH_SIZE: size})
                    changed.append(entry)
        if changed:
            with self.connection.pipeline() as pipe:
                for entry in changed:
                    pipe.hset(entry.job.key, "meta", entry.job.serializer.dumps(entry.job.meta))
                pipe.execute()

    def _job_progress(self, entry: BatchEntry) -> tuple[int, int] | None:
        """A job's progress is its least advanced image's."""
        running = [p for p in (self.engine.progress(r) for r in entry.in_engine) if p]
        return min(running) if running else None

    def _flush_step_log(self) -> None:
        if not self._step_records:
            return
        with self.connection.pipeline() as pipe:
            key = keys.step_log_key(self.name)
            for record in self._step_records:
                pipe.xadd(key, record, maxlen=self.config.step_log_len, approximate=True)
            pipe.expire(key, 24 * 3600)
            pipe.execute()
        self._step_records.clear()

    def _finish_success(self, entry: BatchEntry) -> None:
        entry.job.meta.update(
            {keys.META_STEP: entry.request.steps, keys.META_TOTAL: entry.request.steps, keys.META_STATE: contract.META_STORED}
        )
        entry.job.save_meta()
        entry.finalizing = True
        rq_adapter.finalize_success(self, entry.job, entry.queue, entry.execution, entry.result)
        self._entries.pop(entry.job_id, None)
        job_events.announce(self.connection, entry.job, job_events.STATUS)  # wakes long polls now
        webhook_queue.notify(self.connection, entry.job, "completed")
        metrics.JOBS_COMPLETED.labels(status=contract.SUCCEEDED).inc()
        metrics.IMAGES_GENERATED.inc(len(entry.request_ids))
        if entry.job.created_at:
            metrics.JOB_LATENCY.observe(max((now() - entry.job.created_at).total_seconds(), 0.0))

    def _finish_failure(self, entry: BatchEntry) -> None:
        failure = entry.failure
        assert failure is not None
        log.warning("job %s failed: %s: %s", entry.job_id, failure.code, failure.message)
        if not failure.retry:
            entry.job.retries_left = 0  # a bad request or a storage outage does not get better by re-running
        entry.job.meta[keys.META_ERROR] = {"code": failure.code, "message": failure.message}
        entry.job.save_meta()
        entry.finalizing = True
        try:
            raise GenerationError(failure.code, failure.message)
        except GenerationError:
            rq_adapter.finalize_failure(self, entry.job, entry.queue, entry.execution, sys.exc_info())
        self._entries.pop(entry.job_id, None)
        job_events.announce(self.connection, entry.job, job_events.STATUS)  # failed, or scheduled for a retry
        will_retry = failure.retry and (entry.job.retries_left or 0) > 0
        if entry.job.get_status(refresh=True) == JobStatus.FAILED:  # for good, not rescheduled
            webhook_queue.notify(self.connection, entry.job, "completed")
        metrics.JOBS_COMPLETED.labels(status="retried" if will_retry else contract.FAILED).inc()

    # -- giving jobs back -----------------------------------------------------------------------
    def _requeue_all(self) -> None:
        for entry in list(self._entries.values()):
            try:
                self._requeue(entry)
            except redis.RedisError as exc:  # RQ's abandoned-job clean-up will requeue it later
                log.error("could not requeue job %s: %s", entry.job_id, exc)
        self._entries.clear()

    def _requeue(self, entry: BatchEntry) -> None:
        for request_id in entry.request_ids:
            self.engine.cancel(request_id)
        entry.job.meta.update({keys.META_STEP: 0, keys.META_STATE: contract.META_REQUEUED})
        # Queue first, then drop our execution: a crash in between leaves a queued job (the stale
        # execution expires harmlessly), never a started job that nobody runs.
        entry.queue.enqueue_job(entry.job, at_front=True)
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(entry.job, pipeline=pipe, execution=entry.execution)
            pipe.execute()
        self._entries.pop(entry.job_id, None)
        job_events.announce(self.connection, entry.job, job_events.STATUS)
        log.info("job %s requeued", entry.job_id)

    def _abandon_batch(self) -> None:
        """Leaving abnormally (cold shutdown, a bug): give the jobs back instead of stranding them."""
        if self._entries:
            log.warning("leaving with %d jobs in the batch; requeueing them", len(self._entries))
            self._requeue_all()
