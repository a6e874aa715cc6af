"""Admission that cannot overshoot: the queue cap check and the enqueue in one Lua script.

`CappedQueue` is an RQ `Queue` whose `enqueue_job` saves the job hash and pushes its id only if
the queue holds fewer than `max_queued` jobs, atomically inside Redis, so any number of API
replicas sharing one Redis never admit more than the cap. With `wait_replicas` > 0 the same
connection then runs `WAIT`, and a job that no replica acknowledged in time is taken back out
(so a Sentinel failover cannot lose a job the caller was told about).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from rq import Queue
from rq.job import Job
from rq.scripts import _build_hset_args

log = logging.getLogger("sd3serve.admission")

# KEYS: job hash, queue list, RQ's set of queues. ARGV: job id, cap, job TTL (-1: none), queue key,
# then the job hash's field/value pairs.
ADMIT_SCRIPT = """
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
local ttl = tonumber(ARGV[3])
if ttl and ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""


# Take a job back only if no worker has taken it yet: then it never runs.
TAKE_BACK_SCRIPT = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) > 0 then
    redis.call('DEL', KEYS[2])
    return 1
end
return 0
"""
PROBE_KEY = "sd3serve:replication-probe"


class QueueFull(RuntimeError):
    """The queue already holds `max_queued` jobs; nothing was enqueued."""


class NotReplicated(RuntimeError):
    """Fewer replicas than required acknowledged the enqueue in time. The job stays queued when
    `keep` was asked for (a retry with the same Idempotency-Key finds it); otherwise it was taken
    back if no worker had it yet (`taken_back`)."""

    def __init__(self, message: str, taken_back: bool) -> None:
        super().__init__(message)
        self.taken_back = taken_back


class CappedQueue(Queue):
    def __init__(
        self, name: str, *args: Any, max_queued: int, wait_replicas: int = 0, wait_timeout_ms: int = 1000, **kwargs: Any
    ) -> None:
        super().__init__(name, *args, **kwargs)
        self.max_queued = max_queued
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._admit = self.connection.register_script(ADMIT_SCRIPT)
        self._take_back_script = self.connection.register_script(TAKE_BACK_SCRIPT)
        self._calls = threading.local()  # API handlers enqueue from many threads at once

    @contextmanager
    def keeping_unreplicated(self, keep: bool) -> Iterator[None]:
        """Inside: a job no replica acknowledged stays queued instead of being taken back (for
        requests with an Idempotency-Key, whose retry finds it)."""
        self._calls.keep = keep
        try:
            yield
        finally:
            self._calls.keep = False

    def enqueue_job(self, job: Job, pipeline: Any = None, at_front: bool = False, unique: bool = False) -> Job:
        if pipeline is not None or at_front or unique or job._dependency_ids or job.has_rate_limit:
            # Not a plain admission (RQ internals, requeues, dependencies): RQ's own path, uncapped.
            return super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        job.origin = self.name
        self._prepare_for_queue(job)  # what RQ sets before saving: origin, enqueued_at, timeout, status
        ttl = job.ttl if job.ttl is not None else -1
        args = [job.id, self.max_queued, ttl, self.key, *_build_hset_args(job)]
        # One connection for both, so WAIT counts the replicas that have this very write.
        with self.connection.pipeline(transaction=False) as pipe:
            self._admit(keys=[job.key, self.key, self.redis_queues_keys], args=args, client=pipe)
            if self.wait_replicas:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            results = pipe.execute()
        if not results[0]:
            raise QueueFull(f"the queue holds {self.max_queued} jobs")
        if self.wait_replicas and int(results[1]) < self.wait_replicas:
            taken_back = not getattr(self._calls, "keep", False) and bool(
                self._take_back_script(keys=[self.key, job.key], args=[job.id])
            )
            log.warning(
                "job %s not on %d replicas within %d ms (%s)",
                job.id,
                self.wait_replicas,
                self.wait_timeout_ms,
                "taken back" if taken_back else "left queued",
            )
            raise NotReplicated(f"{results[1]} of {self.wait_replicas} replicas acknowledged job {job.id}", taken_back=taken_back)
        return job

    def replicated(self) -> bool:
        """Whether everything written to the master so far is on `wait_replicas` replicas: a write on
        this connection, then WAIT (the replication stream is ordered, so earlier writes came first)."""
        if not self.wait_replicas:
            return True
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.incr(PROBE_KEY)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            return int(pipe.execute()[1]) >= self.wait_replicas
