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

The parts: RQ's hooks and the loop here; admission in batch_admission.py; the engine step and the
uploads in batch_steps.py; the Redis side in bookkeeping.py; their shared state in batch.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.typing import EncodableT, FieldT
from rq.defaults import DEFAULT_MAINTENANCE_TASK_INTERVAL, DEFAULT_WORKER_TTL
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from worker import keys, metrics, rq_adapter
from worker.batch import BatchEntry, Phase
from worker.batch_admission import BatchAdmission
from worker.batch_steps import BatchStepping
from worker.config import WorkerConfig
from worker.durable_upload import DurableUploader
from worker.redis_conn import connect
from worker.storage import StorageError, storage_from_config

log = logging.getLogger("sd3serve.worker")


class BatchWorker(BatchAdmission, BatchStepping, SimpleWorker):
    # Reconnect to a restarted Redis within seconds, not RQ's one minute.
    max_connection_wait_time = 5.0

    def __init__(
        self,
        queues: Any = None,
        *args: Any,
        config: WorkerConfig | None = None,
        engine: Any = None,
        storage: Any = None,
        **kwargs: Any,
    ) -> None:
        self.config = config or WorkerConfig.from_env()
        queues = queues or [self.config.queue]
        if kwargs.get("connection") is None and all(isinstance(q, str) for q in _as_list(queues)):
            kwargs["connection"] = connect(self.config.redis_url)
        # The RQ CLI always passes its defaults (10-minute maintenance, 7-minute TTL): take the
        # shorter of those and ours, so a dead worker's jobs come back within a minute.
        kwargs["maintenance_interval"] = min(
            kwargs.get("maintenance_interval") or DEFAULT_MAINTENANCE_TASK_INTERVAL, self.config.maintenance_interval
        )
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
        self._step_records: list[dict[FieldT, EncodableT]] = []
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
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ types it as the None it starts as
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

            self.deliverer = start_for_worker(self.connection, self.config.queue, self.config.webhook, self.storage)
        if self.config.metrics_port and self.metrics_server is None:
            self.metrics_server = metrics.start_metrics_server(self.config.metrics_port)
            log.info("metrics on port %d", self.metrics_server.port)

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
            log.info(
                "stop requested: finishing %d jobs (grace %.0fs), admitting no more",
                len(self._entries),
                self.config.shutdown_grace,
            )
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


def _as_list(queues: Any) -> list[Any]:
    return list(queues) if isinstance(queues, (list, tuple)) else [queues]
