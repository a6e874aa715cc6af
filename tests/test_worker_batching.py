"""End to end in one process: the real API under uvicorn, a BatchWorker running the real tiny
engine in a thread, a real Redis and a real S3 server (moto) on loopback."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.results import Result

from api.app import create_app
from tests.fleet_fixtures import (
    ApiServer,
    api_config,
    make_thread_worker,
    s3_storage_config,
    wait_until,
)
from worker import client, keys
from worker.storage import S3Storage, StorageConfig


def _job(api: ApiServer, job_id: str, wait: float = 0) -> dict:
    response = httpx.get(f"{api.url}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10)
    assert response.status_code == 200, response.text
    return response.json()


def _submit(api: ApiServer, **fields) -> dict:
    response = httpx.post(f"{api.url}/v1/jobs", json=fields, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def _step_log(redis_conn, worker_name: str) -> list[dict]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in redis_conn.xrange(keys.step_log_key(worker_name))
    ]


def _successes(redis_conn, job_id: str) -> int:
    job = Job.fetch(job_id, connection=redis_conn)
    return sum(1 for result in job.results() if result.type == Result.Type.SUCCESSFUL)


def test_rest_round_trip_through_s3(fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine):
    storage = s3_storage_config(moto_s3)
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    worker = make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage)
    with ApiServer(app) as api, worker:
        created = _submit(api, prompt="a red circle on a blue background", width=96, height=64, steps=4, seed=11)
        done = _job(api, created["id"], wait=60)
        assert done["status"] == "succeeded", done
        assert done["seed"] == 11 and done["progress"] == {"step": 4, "total": 4}
        assert done["image_url"].startswith(f"{moto_s3.endpoint}/{storage.s3_bucket}/images/{created['id']}.png?")
        assert done["images"] == [done["image_url"]]
        assert done["finished_at"] and done["started_at"] and done["timings"]["generate_seconds"] > 0
        image = httpx.get(done["image_url"])  # straight from S3, through the presigned URL
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(image.content))
        assert picture.format == "PNG" and picture.size == (96, 64)
        redirect = httpx.get(f"{api.url}/v1/jobs/{created['id']}/image")
        assert redirect.status_code == 302
        assert httpx.get(redirect.headers["location"]).content == image.content
    assert _successes(redis_conn, created["id"]) == 1
    steps = _step_log(redis_conn, worker.worker.name)
    assert [r["size"] for r in steps] == ["96x64"] * 4, steps  # width x height of the sub-batch that ran


def test_twenty_concurrent_submissions_batch_and_grow_at_chunk_boundaries(
    fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path
):
    interval = 2  # cache_interval K: new requests may join only every K steps
    storage = StorageConfig(data_dir=str(tmp_path))
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    worker = make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage)
    with ApiServer(app) as api, worker:
        with ThreadPoolExecutor(20) as pool:
            created = list(
                pool.map(
                    lambda i: _submit(api, prompt=f"a blue square number {i}", steps=6, cache_interval=interval, seed=i),
                    range(20),
                )
            )
        ids = [c["id"] for c in created]
        assert len(set(ids)) == 20
        finished = [_job(api, job_id, wait=60) for job_id in ids]
    assert [f["status"] for f in finished] == ["succeeded"] * 20
    assert all(_successes(redis_conn, job_id) == 1 for job_id in ids)

    log = _step_log(redis_conn, worker.worker.name)
    sizes = [int(r["batch_size"]) for r in log]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # the engine's max_batch
    # Index of each step within its sub-batch's life (it restarts when the batch empties).
    growth_at, index = [], 0
    for i, record in enumerate(log):
        if i and int(log[i - 1]["running"]) == 0:
            index = 0
        if i and index and sizes[i] > sizes[i - 1]:
            growth_at.append(index)
        index += 1
    assert growth_at, f"the batch never grew while running: {sizes}"
    assert all(step % interval == 0 for step in growth_at), (growth_at, sizes)
    assert sum(int(r["finished"]) for r in log) == 20


def test_plain_rq_job_is_processed_and_visible_over_rest(fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path):
    storage = StorageConfig(data_dir=str(tmp_path))
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        job = Queue(queue_name, connection=redis_conn).enqueue(
            "worker.jobs.generate", prompt="a yellow triangle on a black background", steps=3
        )
        done = _job(api, job.id, wait=60)
        assert done["status"] == "succeeded", done
        assert isinstance(done["seed"], int)  # drawn by the worker, reported back
        assert done["request"] == {"prompt": "a yellow triangle on a black background", "steps": 3}
        assert done["image_url"].startswith(f"{api.url}/v1/files/{job.id}.png?expires=")  # signed, expiring
        image = httpx.get(done["image_url"])
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
    result = Job.fetch(job.id, connection=redis_conn).return_value()
    assert result["seed"] == done["seed"] and result["image_key"] == f"{job.id}.png"
    assert (tmp_path / "images" / f"{job.id}.png").read_bytes() == image.content


def test_cancel_mid_run_leaves_the_batch_at_the_next_step(fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path):
    storage = StorageConfig(data_dir=str(tmp_path))
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    worker = make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage)
    with ApiServer(app) as api, worker:
        long_job = _submit(api, prompt="a white circle", steps=100)
        short_job = _submit(api, prompt="a black square", steps=8)
        wait_until(lambda: _job(api, long_job["id"])["progress"]["step"] >= 2, 30, what="the long job running")
        assert _job(api, long_job["id"])["status"] == "running"
        canceled = httpx.post(f"{api.url}/v1/jobs/{long_job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        wait_until(lambda: long_job["id"] not in tiny_engine.running_ids(), 5, what="the job leaving the batch")
        assert _job(api, short_job["id"], wait=60)["status"] == "succeeded"
        after = _job(api, long_job["id"])
        assert after["status"] == "canceled" and after["image_url"] is None
        assert after["progress"]["step"] < 100
        assert httpx.post(f"{api.url}/v1/jobs/{short_job['id']}/cancel").status_code == 409  # already ended
    assert not (tmp_path / "images" / f"{long_job['id']}.png").exists()
    assert _successes(redis_conn, long_job["id"]) == 0
    assert Queue(queue_name, connection=redis_conn).started_job_registry.count == 0


def test_a_bad_job_fails_alone(fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path):
    storage = StorageConfig(data_dir=str(tmp_path))
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    queue = Queue(queue_name, connection=redis_conn)
    good = [queue.enqueue("worker.jobs.generate", prompt=f"shape {i}", steps=3) for i in range(3)]
    bad = queue.enqueue("worker.jobs.generate", prompt="shape", width=65)  # bypassed the API's validation
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        failed = _job(api, bad.id, wait=60)
        assert [_job(api, j.id, wait=60)["status"] for j in good] == ["succeeded"] * 3
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_request" and "width" in failed["error"]["message"]
    assert Job.fetch(bad.id, connection=redis_conn).retries_left == 0  # a bad request is not retried


def test_s3_down_while_jobs_finish_then_back(fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine):
    storage = s3_storage_config(moto_s3, attempts=30, backoff=0.2, max_backoff=0.5)
    S3Storage(storage).ensure_ready()  # the bucket exists; then the server goes away
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    with (
        ApiServer(app) as api,
        make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage, heartbeat_ttl=2, heartbeat_every=0.3),
    ):
        moto_s3.stop()
        try:
            ids = [_submit(api, prompt=f"a green circle {i}", steps=4)["id"] for i in range(3)]

            def all_storing() -> bool:
                return all(Job.fetch(i, connection=redis_conn).get_meta().get(keys.META_STATE) == "storing" for i in ids)

            wait_until(all_storing, 30, what="every image computed and waiting for S3")
            time.sleep(2.5)  # longer than the heartbeat TTL: the jobs must stay ours meanwhile
            assert [_job(api, i)["status"] for i in ids] == ["running"] * 3
        finally:
            moto_s3.start()
        results = [_job(api, i, wait=60) for i in ids]
        assert [r["status"] for r in results] == ["succeeded"] * 3
        for job_id, done in zip(ids, results):
            assert Job.fetch(job_id, connection=redis_conn).return_value()["storage_tries"] > 1
            assert _successes(redis_conn, job_id) == 1
            assert httpx.get(done["image_url"]).status_code == 200


def test_stop_past_the_grace_period_requeues_the_batch_at_the_front(fleet_redis, redis_conn, queue_name, tiny_engine, tmp_path):
    storage = StorageConfig(data_dir=str(tmp_path))
    ids = [client.submit(redis_conn, prompt=f"a white square {i}", steps=100, queue=queue_name) for i in range(8)]
    later = client.submit(redis_conn, prompt="queued behind them", steps=2, queue=queue_name)  # batch is full
    worker = make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage, shutdown_grace=0.0)
    with worker:
        wait_until(lambda: all(client.status(redis_conn, i).progress["step"] >= 2 for i in ids), 30, what="the batch running")
        # What SIGTERM does (a thread gets no signals): stop admitting, then requeue at the deadline.
        worker.worker._stop_requested = True
        worker.thread.join(30)
    queue = Queue(queue_name, connection=redis_conn)
    assert queue.started_job_registry.count == 0 and queue.failed_job_registry.count == 0
    assert set(queue.job_ids[:8]) == set(ids) and queue.job_ids[8:] == [later]  # back in front, nothing lost
    for job_id in ids:
        info = client.status(redis_conn, job_id)
        assert info.status == "queued" and info.progress["step"] == 0
    assert tiny_engine.running_ids() == []
    with make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        finals = [client.wait(redis_conn, i, timeout=120) for i in [*ids, later]]
    assert [f.status for f in finals] == ["succeeded"] * 9
    assert all(_successes(redis_conn, i) == 1 for i in [*ids, later])
