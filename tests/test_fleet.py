"""The fleet under failure, with real processes: `sd3serve worker` killed with SIGKILL or stopped
with SIGTERM mid-batch, Redis killed and restarted from its append-only file, and the RQ
command line running the same jobs. Tiny model on CPU; short heartbeats (2 s) and maintenance
(1 s) so recovery takes seconds instead of the production minute."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result

from tests.fleet_fixtures import (
    REPO,
    RedisServer,
    WorkerProcess,
    kill_hard,
    make_thread_worker,
    wait_until,
    worker_env,
    worker_processes,
)
from worker import client, keys
from worker.storage import StorageConfig

pytestmark = pytest.mark.slow


def _running_on(redis_conn, job_ids, worker_name):
    jobs = [Job.fetch(i, connection=redis_conn) for i in job_ids]
    return [
        j.id
        for j in jobs
        if j.get_status() == JobStatus.STARTED and j.worker_name == worker_name and (j.get_meta().get(keys.META_STEP) or 0) >= 2
    ]


def _assert_each_succeeded_once(redis_conn, job_ids):
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=redis_conn)
        assert job.get_status() == JobStatus.FINISHED, (job_id, job.get_status())
        successes = [r for r in job.results() if r.type == Result.Type.SUCCESSFUL]
        assert len(successes) == 1, f"job {job_id} finished {len(successes)} times"


def _start_and_submit(
    procs: list, env: dict, log, redis_conn, queue: str, prompt: str, steps: int, n: int
) -> tuple[str, list[str]]:
    """Start a worker process, wait until it registers, then submit `n` jobs; its name and the ids."""
    worker = WorkerProcess(env, log)
    procs.append(worker)
    name = worker.wait_registered()
    ids = [client.submit(redis_conn, prompt=f"{prompt} {i}", steps=steps, width=64, height=64, queue=queue) for i in range(n)]
    return name, ids


def test_kill_9_mid_batch_a_second_worker_finishes_every_job_once(
    fleet_redis, redis_conn, queue_name, tiny_model_dir, tiny_engine, tmp_path
):
    env = worker_env(tiny_model_dir, fleet_redis.url, queue_name, tmp_path / "data", SD3SERVE_MAX_BATCH="6")
    with worker_processes() as procs:
        victim_name, ids = _start_and_submit(
            procs, env, tmp_path / "victim.log", redis_conn, queue_name, "a red circle", steps=40, n=10
        )
        victim = procs[-1]
        # The survivor (a BatchWorker in this process) starts while the victim is mid-batch.
        survivor = make_thread_worker(
            tiny_engine,
            fleet_redis.url,
            queue_name,
            StorageConfig(data_dir=str(tmp_path / "data")),
            heartbeat_ttl=2,
            heartbeat_every=0.3,
            maintenance_interval=1,
        )
        with survivor:
            wait_until(
                lambda: len(_running_on(redis_conn, ids, victim_name)) >= 3, 60, interval=0.1, what="the victim running a batch"
            )
            kill_hard(victim)
            killed_at = time.monotonic()
            orphans = [
                j.id
                for j in map(lambda i: Job.fetch(i, connection=redis_conn), ids)
                if j.get_status() == JobStatus.STARTED and j.worker_name == victim_name
            ]
            assert len(orphans) >= 3

            def taken_over() -> bool:
                return all(Job.fetch(i, connection=redis_conn).worker_name == survivor.worker.name for i in orphans)

            wait_until(taken_over, 30, interval=0.1, what="the orphaned jobs taken over")
            takeover_seconds = time.monotonic() - killed_at
            finals = [client.wait(redis_conn, i, timeout=120) for i in ids]
    assert [f.status for f in finals] == ["succeeded"] * len(ids)
    _assert_each_succeeded_once(redis_conn, ids)
    for job_id in orphans:
        job = Job.fetch(job_id, connection=redis_conn)
        assert job.return_value()["worker"] == survivor.worker.name
        assert job.retries_left == client.DEFAULT_RETRIES - 1  # re-run through RQ's abandoned-job retry
    # heartbeat TTL (2 s) + maintenance interval (1 s) + a batch step or two
    print(f"orphans {len(orphans)}, taken over {takeover_seconds:.1f}s after kill -9")
    assert takeover_seconds < 10, takeover_seconds
    queue = Queue(queue_name, connection=redis_conn)
    assert queue.started_job_registry.count == 0 and queue.failed_job_registry.count == 0


def test_sigterm_mid_batch_finishes_the_batch_admits_nothing_more_and_loses_nothing(
    fleet_redis, redis_conn, queue_name, tiny_model_dir, tiny_engine, tmp_path
):
    env = worker_env(
        tiny_model_dir, fleet_redis.url, queue_name, tmp_path / "data", SD3SERVE_MAX_BATCH="3", SD3SERVE_SHUTDOWN_GRACE="60"
    )
    with worker_processes() as procs:
        name, ids = _start_and_submit(procs, env, tmp_path / "worker.log", redis_conn, queue_name, "a blue square", steps=30, n=7)
        worker = procs[-1]
        running = wait_until(
            lambda: r if len(r := _running_on(redis_conn, ids, name)) == 3 else None,
            60,
            interval=0.1,
            what="a full batch running",
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.output()
    statuses = {i: Job.fetch(i, connection=redis_conn).get_status() for i in ids}
    assert {statuses[i] for i in running} == {JobStatus.FINISHED}, worker.output()
    for job_id in running:
        assert Job.fetch(job_id, connection=redis_conn).return_value()["worker"] == name
    rest = [i for i in ids if i not in running]
    assert [statuses[i] for i in rest] == [JobStatus.QUEUED] * len(rest), statuses  # none admitted after SIGTERM
    assert all(Job.fetch(i, connection=redis_conn).started_at is None for i in rest)
    assert Queue(queue_name, connection=redis_conn).started_job_registry.count == 0
    # Nothing was lost: another worker finishes the rest.
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path / "data"))):
        finals = [client.wait(redis_conn, i, timeout=120) for i in ids]
    assert [f.status for f in finals] == ["succeeded"] * len(ids)
    _assert_each_succeeded_once(redis_conn, ids)


def test_redis_restart_with_aof_queued_and_running_jobs_survive(tiny_engine, tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    import redis as redis_lib

    conn = redis_lib.Redis.from_url(server.url)
    queue = "sd3serve-aof"
    try:
        ids = [client.submit(conn, prompt=f"a yellow circle {i}", steps=25, width=64, height=64, queue=queue) for i in range(12)]
        worker = make_thread_worker(
            tiny_engine, server.url, queue, StorageConfig(data_dir=str(tmp_path / "data")), heartbeat_ttl=8, heartbeat_every=0.3
        )
        with worker:
            wait_until(lambda: len(_running_on(conn, ids, worker.worker.name)) >= 4, 60, interval=0.1, what="a batch running")
            server.kill()  # SIGKILL: only what the append-only file holds survives
            time.sleep(1.0)
            server.start()
            after_restart = {i: Job.fetch(i, connection=conn).get_status() for i in ids}
            finals = [client.wait(conn, i, timeout=120) for i in ids]
        assert JobStatus.QUEUED in after_restart.values()  # queued jobs came back from the AOF
        assert [f.status for f in finals] == ["succeeded"] * len(ids)
        _assert_each_succeeded_once(conn, ids)
    finally:
        server.stop()


def test_rq_cli_runs_the_batching_worker_and_the_stock_worker(fleet_redis, redis_conn, queue_name, tiny_model_dir, tmp_path):
    env = worker_env(tiny_model_dir, fleet_redis.url, queue_name, tmp_path / "data")
    rq = str(REPO / ".venv" / "bin" / "rq") if (REPO / ".venv" / "bin" / "rq").exists() else "rq"
    batched = [
        Queue(queue_name, connection=redis_conn).enqueue("worker.jobs.generate", prompt=f"a shape {i}", steps=4) for i in range(4)
    ]
    name = f"cli-{queue_name}"
    subprocess.run(
        [rq, "worker", "--burst", "--worker-class", "worker.BatchWorker", "--url", fleet_redis.url, "--name", name, queue_name],
        cwd=REPO,
        env=env,
        check=True,
        timeout=180,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert all(client.status(redis_conn, j.id).status == "succeeded" for j in batched)
    sizes = [int(f[b"batch_size"]) for _, f in redis_conn.xrange(keys.step_log_key(name))]
    assert max(sizes) > 1  # the RQ command line got the batching worker

    alone = client.submit(redis_conn, prompt="a lone triangle", steps=3, width=64, height=64, queue=queue_name)
    subprocess.run(
        [rq, "worker", "--burst", "--url", fleet_redis.url, queue_name],
        cwd=REPO,
        env=env,
        check=True,
        timeout=180,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    info = client.status(redis_conn, alone)
    assert info.status == "succeeded", info.error
    assert (tmp_path / "data" / "images" / f"{alone}.png").exists()
    assert info.result["width"] == 64 and info.result["seed"] == info.seed
