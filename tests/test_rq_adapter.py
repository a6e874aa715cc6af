"""worker/rq_adapter.py: the RQ internals the batching worker uses exist with the parameters we
pass (this file fails loudly when an RQ upgrade changes one), and they do on a real Redis what
the worker relies on: a job started and ended through them lands in RQ's own registries."""

from __future__ import annotations

import sys
import uuid

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from worker import rq_adapter
from worker.batch_worker import BatchWorker
from worker.config import WorkerConfig


def test_the_installed_rq_has_everything_the_batch_worker_uses(redis_url):
    connection = redis.Redis.from_url(redis_url)
    worker = SimpleWorker([Queue(f"adapter-{uuid.uuid4().hex[:8]}", connection=connection)], connection=connection)
    assert rq_adapter.contract_problems(worker) == []


def _defining_class(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def test_a_changed_or_missing_rq_method_is_reported_by_name(monkeypatch, redis_url):
    monkeypatch.setattr(SimpleWorker, "_finalize_success", lambda self, job, result: None)
    monkeypatch.delattr(_defining_class(SimpleWorker, "prepare_execution"), "prepare_execution")
    problems = rq_adapter.contract_problems()
    assert any("_finalize_success takes ('job', 'result')" in p for p in problems)
    assert any("prepare_execution is gone" in p for p in problems)
    with pytest.raises(RuntimeError, match=r"RQ .* changed what worker.BatchWorker relies on"):
        BatchWorker(["q"], connection=redis.Redis.from_url(redis_url), config=WorkerConfig())


def test_a_missing_private_worker_attribute_is_reported(redis_url):
    connection = redis.Redis.from_url(redis_url)
    worker = SimpleWorker([Queue("q", connection=connection)], connection=connection)
    del worker._ordered_queues
    assert rq_adapter.contract_problems(worker) == ["workers have no attribute _ordered_queues"]


def test_jobs_started_and_ended_through_the_adapter_land_in_rqs_registries(redis_url):
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(f"adapter-{uuid.uuid4().hex[:8]}", connection=connection)
    worker = SimpleWorker([queue], connection=connection)
    worker.register_birth()
    try:
        good = queue.enqueue("builtins.len", "abc")
        bad = queue.enqueue("builtins.len", "abc")
        started = {}
        for _ in range(2):
            job, from_queue = rq_adapter.dequeue_now(worker)
            assert from_queue.name == queue.name
            started[job.id] = (job, rq_adapter.start_execution(worker, job))
        assert rq_adapter.dequeue_now(worker) is None  # the queue is empty: no blocking wait
        assert set(queue.started_job_registry.get_job_ids()) == {good.id, bad.id}
        assert Job.fetch(good.id, connection=connection).get_status() == JobStatus.STARTED

        job, execution = started[good.id]
        rq_adapter.finalize_success(worker, job, queue, execution, {"image_key": "k"})
        job, execution = started[bad.id]
        try:
            raise RuntimeError("broken (injected)")
        except RuntimeError:
            rq_adapter.finalize_failure(worker, job, queue, execution, sys.exc_info())

        done = Job.fetch(good.id, connection=connection)
        assert done.get_status() == JobStatus.FINISHED and done.return_value() == {"image_key": "k"}
        assert good.id in queue.finished_job_registry.get_job_ids()
        failed = Job.fetch(bad.id, connection=connection)
        assert failed.get_status() == JobStatus.FAILED and "broken (injected)" in failed.latest_result().exc_string
        assert bad.id in queue.failed_job_registry.get_job_ids()
        assert queue.started_job_registry.get_job_ids() == []
        assert not rq_adapter.stop_requested(worker)
    finally:
        worker.register_death()
        queue.delete(delete_jobs=True)
