"""Failures inside a batch stay inside one job: an out-of-memory step costs only the newest
request (re-run through RQ's retry), a broken step re-runs its requests, the others carry on;
ordinary RQ jobs in the same queue run (or fail) the stock way. Real tiny engine; the faults are
injected into its runner."""

from __future__ import annotations

import os

import torch
from rq import Queue
from rq.job import Job

from tests.fleet_fixtures import (
    make_thread_worker,
    wait_until,
)
from worker import client
from worker.storage import StorageConfig


def _fail_once(engine, monkeypatch, exc: Exception, when) -> list[int]:
    real_run = engine.runner.run
    fired: list[int] = []

    def run(plan):
        if not fired and when(plan):
            fired.append(len(plan.requests))
            raise exc
        return real_run(plan)

    monkeypatch.setattr(engine.runner, "run", run)
    return fired


def test_out_of_memory_fails_only_the_newest_request_which_is_retried(
    fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path, monkeypatch
):
    fired = _fail_once(
        tiny_engine, monkeypatch, torch.OutOfMemoryError("CUDA out of memory (injected)"), lambda plan: len(plan.requests) >= 3
    )
    ids = [client.submit(redis_conn, prompt=f"a purple circle {i}", steps=6, queue=queue_name) for i in range(4)]
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path))):
        finals = [client.wait(redis_conn, i, timeout=60) for i in ids]
    assert fired, "the fault never fired"
    assert [f.status for f in finals] == ["succeeded"] * 4
    retries = [Job.fetch(i, connection=redis_conn).retries_left for i in ids]
    assert sorted(retries) == [client.DEFAULT_RETRIES - 1] + [client.DEFAULT_RETRIES] * 3  # one job re-ran


def test_a_broken_step_reruns_its_requests_and_the_worker_goes_on(
    fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path, monkeypatch
):
    fired = _fail_once(tiny_engine, monkeypatch, RuntimeError("kernel exploded (injected)"), lambda plan: True)
    ids = [client.submit(redis_conn, prompt=f"an orange square {i}", steps=4, queue=queue_name) for i in range(3)]
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path))):
        finals = [client.wait(redis_conn, i, timeout=60) for i in ids]
        after = client.submit(redis_conn, prompt="and one more", steps=2, queue=queue_name)
        assert client.wait(redis_conn, after, timeout=60).status == "succeeded"
    assert fired
    assert [f.status for f in finals] == ["succeeded"] * 3
    retries = [Job.fetch(i, connection=redis_conn).retries_left for i in ids]
    assert retries.count(client.DEFAULT_RETRIES - 1) == fired[0]  # exactly the requests of the broken step re-ran


def test_retries_exhausted_fail_with_the_engine_error(fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path, monkeypatch):
    def always_broken(plan):
        raise RuntimeError("kernel exploded (injected)")

    monkeypatch.setattr(tiny_engine.runner, "run", always_broken)
    job_id = client.submit(redis_conn, prompt="doomed", steps=2, queue=queue_name, options=client.JobOptions(retries=1))
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path))):
        info = client.wait(redis_conn, job_id, timeout=60)
    assert info.status == "failed"
    assert info.error["code"] == "engine_error" and "kernel exploded" in info.error["message"]


def test_other_rq_jobs_in_the_queue_run_the_stock_way_between_generations(
    fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path
):
    queue = Queue(queue_name, connection=redis_conn)
    first = client.submit(redis_conn, prompt="before", steps=2, queue=queue_name)
    plain = queue.enqueue("os.getpid")
    broken = queue.enqueue("os.path.join", 1, 2)  # raises TypeError: an ordinary failed RQ job
    last = client.submit(redis_conn, prompt="after", steps=2, queue=queue_name)
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path))):
        assert [client.wait(redis_conn, j, timeout=60).status for j in (first, last)] == ["succeeded"] * 2
        wait_until(lambda: plain.get_status() == "finished" and broken.get_status() == "failed", 30, what="the plain RQ jobs")
    assert plain.return_value() == os.getpid()  # ran in the worker's own process (a SimpleWorker: no fork)
    assert broken.get_status() == "failed" and "TypeError" in broken.latest_result().exc_string
