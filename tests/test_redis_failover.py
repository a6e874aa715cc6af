"""Redis failover without losing an accepted job: a master, a replica and three sentinels
(tests/sentinel_cluster.py), the real API (Sentinel URL, WAIT for one replica) and a real
`sd3serve worker` process. 100 jobs go in at a steady rate; the master gets `kill -9` mid-run."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rq import Queue, Worker
from rq.job import Job
from rq.results import Result

from api.app import create_app
from tests.fleet_fixtures import ApiServer, WorkerProcess, api_config, worker_env
from tests.sentinel_cluster import sentinel_cluster
from tests.stack_processes import wait_until
from worker.redis_conn import connect
from worker.storage import StorageConfig

JOBS, EVERY, KILL_AT = 100, 0.15, 30  # a job every 0.15 s; the master dies after job 30 went in


@pytest.mark.slow
def test_a_master_killed_mid_run_loses_no_accepted_job(tmp_path, queue_name, tiny_model_dir):
    with sentinel_cluster(tmp_path / "redis", wait_ready=False) as cluster:
        storage = StorageConfig(data_dir=str(tmp_path / "data"))
        config = api_config(
            cluster.url, queue_name, storage=storage, redis_wait_replicas=1, redis_wait_timeout_ms=500, max_queued=1000
        )
        env = worker_env(tiny_model_dir, cluster.url, queue_name, tmp_path / "data", SD3SERVE_NAME="failover-worker")
        worker = WorkerProcess(env, tmp_path / "worker.log")  # loads while the sentinels find each other
        try:
            with ApiServer(create_app(config)) as api:
                cluster.wait_ready()
                redis = connect(cluster.url, socket_timeout=5)
                wait_until(
                    lambda: any(w.name == "failover-worker" for w in Worker.all(connection=redis)),
                    120,
                    interval=0.3,
                    what=f"the worker registered:\n{worker.output()}",
                )
                outcome = _submit_while_killing_the_master(api, cluster)
                accepted = outcome["accepted"]
                assert sorted(accepted) == list(range(JOBS)), f"not every job got a 202: {outcome['gave_up']}"
                ids = [accepted[i] for i in range(JOBS)]
                assert len(set(ids)) == JOBS
                # 503, never 202, between the kill and the election of the new master.
                blind = [
                    code
                    for start, end, code in outcome["attempts"]
                    if start > outcome["killed_at"] and end < outcome["elected_at"]
                ]
                assert blind and set(blind) == {503}, blind
                codes = [code for _, _, code in outcome["attempts"]]
                print(
                    f"failover: elected {outcome['elected_at'] - outcome['killed_at']:.2f} s after the kill; "
                    f"{len(codes)} attempts: {codes.count(202)} x 202, {codes.count(503)} x 503, "
                    f"{codes.count(409)} x 409, {len(blind)} of them (all 503) while no master was elected"
                )
                finals = _final_statuses(api, ids, timeout=150)
                assert set(finals.values()) == {"succeeded"}, (
                    {s: sum(v == s for v in finals.values()) for s in set(finals.values())},
                    worker.output(),
                    cluster.logs(),
                )
                queue = Queue(queue_name, connection=redis)
                assert sorted(queue.finished_job_registry.get_job_ids()) == sorted(ids)
                assert queue.failed_job_registry.count == 0 and queue.count == 0
                for job_id in ids:  # exactly once: one successful result per job, no extra jobs
                    job = Job.fetch(job_id, connection=redis)
                    assert sum(r.type == Result.Type.SUCCESSFUL for r in job.results()) == 1, job_id
                assert worker.process.poll() is None, "the worker died instead of following the new master"
                assert cluster.master_port() == cluster.ports["b"]
        finally:
            worker.close()


def _final_statuses(api: ApiServer, ids: list[str], timeout: float) -> dict[str, str]:
    """Each job's end status (or the last answer about it, if it had not ended by the deadline)."""
    deadline = time.monotonic() + timeout
    finals: dict[str, str] = {}
    with httpx.Client(base_url=api.url, timeout=40) as http:
        for job_id in ids:
            last = "no answer"
            while time.monotonic() < deadline:
                response = http.get(f"/v1/jobs/{job_id}", params={"wait": 20})
                body = response.json()
                last = body.get("status") or f"{response.status_code} {body.get('error', {}).get('message')}"
                if last in ("succeeded", "failed", "canceled"):
                    break
                if response.status_code != 200:
                    time.sleep(0.3)  # Redis unavailable for a moment: ask again
            finals[job_id] = last
    return finals


def _submit_while_killing_the_master(api: ApiServer, cluster) -> dict:
    """Submit JOBS jobs at a steady rate, each retried with its Idempotency-Key until it gets a 202;
    kill -9 the master after KILL_AT, bring the old master back as a replica once a new one is elected."""
    attempts: list[tuple[float, float, int]] = []
    accepted: dict[int, str] = {}
    gave_up: dict[int, str] = {}
    marks: dict[str, float] = {}
    lock = threading.Lock()

    def submit(index: int) -> None:
        with httpx.Client(base_url=api.url, timeout=15) as http:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    response = http.post(
                        "/v1/jobs",
                        json={"prompt": f"a red circle {index}", "steps": 2, "seed": index},
                        headers={"Idempotency-Key": f"failover-{index}"},
                    )
                    code = response.status_code
                except httpx.HTTPError:
                    code = 0
                with lock:
                    attempts.append((start, time.monotonic(), code))
                if code == 202:
                    accepted[index] = response.json()["id"]
                    return
                assert code in (503, 409, 0), response.text  # unavailable, or the key's first try in flight
                time.sleep(0.3)
            gave_up[index] = "no 202 within 90 s"

    def fail_over() -> None:
        cluster.kill("a")
        marks["killed_at"] = time.monotonic()
        wait_until(lambda: cluster.master_port() == cluster.ports["b"], 60, interval=0.05, what="a new master")
        marks["elected_at"] = time.monotonic()
        cluster.restart_as_replica("a", cluster.ports["b"])  # what a supervisor would do

    with ThreadPoolExecutor(JOBS + 1) as pool:
        futures = []
        failover = None
        for index in range(JOBS):
            if index == KILL_AT:
                failover = pool.submit(fail_over)
            futures.append(pool.submit(submit, index))
            time.sleep(EVERY)
        failover.result()
        for future in futures:
            future.result()
    return {"attempts": attempts, "accepted": accepted, "gave_up": gave_up, **marks}
