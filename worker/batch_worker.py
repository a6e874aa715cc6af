"""`BatchWorker`: an RQ 3 `SimpleWorker` that runs many generation jobs in one step-level batch.

RQ's own loop dequeues the first job (BLMOVE through the intermediate queue) and calls
`execute_job`. For a `worker.jobs.generate` job that starts a batch: each job is registered the
way RQ registers one (an Execution in the StartedJobRegistry, status STARTED), its request goes
to the engine, and the loop below steps the engine until the batch drains. At every chunk
boundary the engine reports free slots, and more jobs are taken from the queue without blocking.
Each job ends through RQ's own success/failure handling, so registries, results, TTLs, retries
and abandoned-job clean-up behave as for any RQ job. Other jobs run the stock SimpleWorker way.

Work and bookkeeping are split: an iteration first steps the engine (no Redis), then syncs with
Redis (heartbeats, cancellations, admissions, progress, finished jobs). If Redis is briefly
unreachable the sync is retried on the next iteration and nothing computed is lost.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

import redis
from rq.defaults import DEFAULT_MAINTENANCE_TASK_INTERVAL, DEFAULT_WORKER_TTL
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from engine.request import RequestValidationError
from worker import keys, metrics, rq_adapter, webhook_queue
from worker.batch import BatchEntry, Phase
from worker.bookkeeping import BatchBookkeeping
from worker.config import WorkerConfig
from worker.durable_upload import DurableUploader, StoreFailed
from worker.job_spec import split_request_id
from worker.jobs import build_result, job_from_kwargs
from worker.redis_conn import connect
from worker.storage import StorageError, storage_from_config

log = logging.getLogger("sd3serve.worker")


class BatchWorker(BatchBookkeeping, SimpleWorker):
    # Reconnect to a restarted Redis within seconds, not RQ's one minute.
    max_connection_wait_time = 5.0

    def __init__(self, queues: Any = None, *args: Any, config: WorkerConfig | None = None,
                 engine: Any = None, storage: Any = None, **kwargs: Any) -> None:
        self.config = config or WorkerConfig.from_env()
        queues = queues or [self.config.queue]
        if kwargs.get("connection") is None and all(isinstance(q, str) for q in _as_list(queues)):
            kwargs["connection"] = connect(self.config.redis_url)
        # The RQ CLI always passes its defaults (10-minute maintenance, 7-minute TTL): take the
        # shorter of those and ours, so a dead worker's jobs come back within a minute.
        kwargs["maintenance_interval"] = min(
            kwargs.get("maintenance_interval") or DEFAULT_MAINTENANCE_TASK_INTERVAL, self.config.maintenance_interval)
        ttl = min(kwargs.get("worker_ttl") or DEFAULT_WORKER_TTL, self.config.worker_ttl)
        kwargs["worker_ttl"] = ttl
        kwargs.pop("default_worker_ttl", None)
        if not kwargs.get("name"):
            kwargs["name"] = self.config.worker_name
        super().__init__(queues, *args, **kwargs)
        rq_adapter.require_contract(self)
        self.engine = engine
        self.storage = storage
        self._entries: dict[str, BatchEntry] = {}
        self._uploads: DurableUploader | None = None
        self._steps = 0
        self._step_records: list[dict[str, Any]] = []
        self._next_heartbeat = 0.0
        self._next_gpu_sample = 0.0
        self._stop_deadline: float | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.deliverer: Any = None  # webhook deliveries, in threads of their own (worker.webhook_deliverer)

    # -- RQ hooks -------------------------------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # An idle worker must wake up for maintenance, or it would not requeue a dead worker's jobs.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's blocking dequeue, one wait at a time, so a stop request made without a signal
        (a worker in a thread) is seen within `dequeue_timeout` seconds."""
        if timeout is None:
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        idle_since = time.monotonic()
        while True:
            if rq_adapter.stop_requested(self):
                raise StopRequested()
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
            if result is not None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.config.heartbeat_ttl

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()
        else:  # a worker in a thread: no signals, and ordinary jobs' timeouts use a timer instead
            self.death_penalty_class = TimerDeathPenalty

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        self.load()
        super().bootstrap(*args, **kwargs)

    def teardown(self) -> None:
        if self._uploads is not None:
            self._uploads.shutdown()
            self._uploads = None
        if self.deliverer is not None:
            self.deliverer.stop()
            self.deliverer = None
        super().teardown()

    def clean_registries(self) -> None:
        """RQ's clean-up, with a maintenance lock that lapses with our interval (RQ's lasts 15
        minutes, so a worker killed while holding it would stall recovery that long)."""
        lock_seconds = max(int(self.maintenance_interval) * 2, 5)
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_seconds):
                rq_adapter.clean_queue(self, queue)
        self.last_cleaned_at = now()
        if self._uploads is not None:
            self._uploads.restore_bucket()  # /readyz checks the bucket: do not wait for an upload

    def execute_job(self, job: Job, queue: Queue) -> None:
        if not keys.is_generation(job):
            super().execute_job(job, queue)
            return
        try:
            if self._admit(job, queue):
                self._admit_more()  # an idle engine takes a whole first chunk at once
            self._run_batch()
        except BaseException:
            self._abandon_batch()
            raise
        finally:
            metrics.RUNNING_REQUESTS.set(0)
        self.set_state(WorkerStatus.IDLE)

    # -- setup ----------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and open storage (once); start the metrics server if configured."""
        if self.engine is None:
            from engine.engine import Engine

            log.info("loading model %s", self.config.engine.model)
            self.engine = Engine.from_config(self.config.engine)
            self.engine.warm_up()  # compile before the first job, not inside it
        if self.storage is None:
            self.storage = storage_from_config(self.config.storage)
            try:
                self.storage.ensure_ready()
            except StorageError as exc:
                log.warning("storage not ready yet (uploads will retry): %s", exc)
        if self._uploads is None:
            self._uploads = DurableUploader(self.storage, self.config.storage, self.config.upload_threads)
        if self.config.webhook.enabled and self.config.webhook.threads and self.deliverer is None:
            from worker.webhook_deliverer import start_for_worker

            self.deliverer = start_for_worker(self.connection, self.config.queue, self.config.webhook,
                                              self.storage)
        if self.config.metrics_port and self.metrics_server is None:
            self.metrics_server = metrics.start_metrics_server(self.config.metrics_port)
            log.info("metrics on port %d", self.metrics_server.port)

    @property
    def limits(self) -> Any:
        return getattr(self.engine, "limits", self.config.engine.limits)

    # -- the batch loop ---------------------------------------------------------------------------
    def _run_batch(self) -> None:
        backoff = 0.5
        while self._entries:
            self._step_engine()
            try:
                self._sync()
                backoff = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.error("Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_connection_wait_time)
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                log.warning("shutdown grace period over; requeueing %d unfinished jobs", len(self._entries))
                self._requeue_all()
                break
        self._purge_engine()

    def _purge_engine(self) -> None:
        """The batch is over: let the engine drop canceled requests now, not when the next job comes."""
        for request_id in self.engine.running_ids():
            if request_id not in self._entries:
                self.engine.cancel(request_id)
        self.engine.drop_canceled()

    def _step_engine(self) -> None:
        if not self.engine.has_work():
            for entry in self._entries.values():
                if entry.phase is Phase.RUNNING:  # cannot happen unless the engine lost it
                    entry.fail("engine_error", "the engine dropped the request without a result", retry=True)
            uploads = [e.upload for e in self._entries.values() if e.phase is Phase.STORING and e.upload]
            uploads = [u for u in uploads if u is not None]
            if uploads:
                held = self._uploads is not None and self._uploads.waiting  # storage is down: poll slower
                wait(uploads, timeout=0.5 if held else 0.05, return_when=FIRST_COMPLETED)
            self._collect_uploads()
            return
        try:
            report = self.engine.step()
        except Exception as exc:  # a broken step fails the requests in it, not the worker
            log.exception("engine step failed")
            for entry in self._entries.values():
                if entry.phase is Phase.RUNNING:
                    for request_id in entry.request_ids:
                        self.engine.cancel(request_id)
                    entry.fail("engine_error", f"the engine failed: {exc}", retry=True)
            return
        self._steps += 1
        for failed in report.failed:
            entry = self._entries.get(split_request_id(failed.request.request_id)[0])
            if entry is not None and entry.phase is Phase.RUNNING:
                for request_id in entry.in_engine - {failed.request.request_id}:
                    self.engine.cancel(request_id)  # the job fails as a whole; its other images stop
                entry.fail(failed.code, failed.message, retry=failed.code == "out_of_memory")
        for finished in report.finished:
            job_id, index = split_request_id(finished.request.request_id)
            entry = self._entries.get(job_id)
            if entry is None or entry.phase is not Phase.RUNNING:
                continue
            entry.in_engine.discard(finished.request.request_id)
            if not entry.in_engine:
                entry.phase = Phase.STORING
            entry.generate_seconds = max(entry.generate_seconds, finished.seconds)
            entry.uploads[index] = self._uploads.submit(entry.job_id, finished.image, entry.spec, index)
        if report.batch_size:
            metrics.STEP_DURATION.observe(report.step_seconds)
            metrics.BATCH_SIZE.observe(report.batch_size)
            metrics.FRESH_RATIO.set(report.fresh_ratio)
        metrics.RUNNING_REQUESTS.set(len(self.engine.running_ids()))
        if self.config.step_log_len:
            self._step_records.append({
                "t": f"{time.time():.4f}", "batch_size": report.batch_size, "fresh_ratio": f"{report.fresh_ratio:.3f}",
                "step_seconds": f"{report.step_seconds:.5f}", "finished": len(report.finished),
                "running": len(self.engine.running_ids())})
        self._collect_uploads()

    def _collect_uploads(self) -> None:
        for entry in self._entries.values():
            if entry.phase is not Phase.STORING or entry.upload is not None:
                continue  # images still running, or uploads under way
            try:
                stored = [entry.uploads[i].result() for i in sorted(entry.uploads)]
            except StoreFailed as exc:  # past the storage deadline: RQ's retry path, if retries remain
                entry.fail(exc.code, exc.message, retry=exc.retry)
                continue
            except Exception:
                log.exception("storing the image of job %s failed", entry.job_id)
                entry.fail("storage_error", "the image could not be stored (see the worker log)", retry=True)
                continue
            entry.result = build_result(entry.spec, stored, entry.generate_seconds, entry.job.enqueued_at,
                                        entry.job.started_at, now(), self.name)
            entry.phase = Phase.SUCCEEDED

    def _sync(self) -> None:
        """Everything that talks to Redis, in an order that is safe to repeat after a failure."""
        self._heartbeat_if_due()
        self._drop_canceled()
        self._enforce_timeouts()
        for entry in list(self._entries.values()):
            if entry.phase is Phase.SUCCEEDED:
                self._finish_success(entry)
            elif entry.phase is Phase.FAILED:
                self._finish_failure(entry)
        self._write_progress()
        self._flush_step_log()
        if rq_adapter.stop_requested(self) and self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.config.shutdown_grace
            log.info("stop requested: finishing %d jobs (grace %.0fs), admitting no more",
                     len(self._entries), self.config.shutdown_grace)
        if self._stop_deadline is None:
            self._admit_more()
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()
        if time.monotonic() >= self._next_gpu_sample:
            self._next_gpu_sample = time.monotonic() + 1.0
            metrics.CACHE_BYTES.set(self.engine.cache_bytes())
            metrics.CACHE_ALLOCATED_BYTES.set(self.engine.cache_allocated_bytes())
            if self.config.engine.device != "cpu":
                try:
                    metrics.sample_gpu_memory()
                except Exception:  # pragma: no cover - metrics never stop the worker
                    pass

    # -- admission ------------------------------------------------------------------------------
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
        job.meta.update({keys.META_STEP: 0, keys.META_TOTAL: entry.request.steps,
                         keys.META_SEED: entry.request.seed, keys.META_STATE: Phase.RUNNING.value})
        job.save_meta()
        webhook_queue.notify(self.connection, job, "start")
        log.info("admitted job %s (%d x %dx%d, %d steps), %d in batch", job.id, len(entry.request_ids),
                 entry.request.width, entry.request.height, entry.request.steps, len(self._entries))
        return entry


def _as_list(queues: Any) -> list[Any]:
    return list(queues) if isinstance(queues, (list, tuple)) else [queues]
