"""Finished images survive storage outages (worker/durable_upload.py): the real API, a BatchWorker
with the tiny engine in a thread, a real Redis and moto's S3 server on loopback, stopped and
restarted on the same port."""

from __future__ import annotations

import time

import boto3
import httpx
import pytest
from rq import Queue
from rq.job import Job
from rq.results import Result

from api.app import create_app
from tests.fleet_fixtures import S3_KEYS, ApiServer, api_config, make_thread_worker, s3_storage_config, wait_until
from worker import keys
from worker.durable_upload import DurableUploader, StoreFailed
from worker.storage import S3Storage

# How long storage stays down once all 8 images are held. What a longer outage could break is
# paced by the worker's clocks, all short here: the jobs' heartbeat TTL (2 s), registry
# maintenance (1 s) and the retry backoff (at most 2 s). 10 s is five heartbeat TTLs and five
# tries at the longest backoff with every image on disk (it was 60 s from the first submission).
HELD_SECONDS = 10


def _submit(api: ApiServer, **fields) -> str:
    response = httpx.post(f"{api.url}/v1/jobs", json=fields, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _job(api: ApiServer, job_id: str, wait: float = 0) -> dict:
    response = httpx.get(f"{api.url}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10)
    assert response.status_code == 200, response.text
    return response.json()


def _state(redis_conn, job_id: str) -> str | None:
    return Job.fetch(job_id, connection=redis_conn).get_meta().get(keys.META_STATE)


def _internals(storage, moto_s3) -> list[str]:
    return [storage.s3_bucket, "127.0.0.1", str(moto_s3.port), "http", "localhost"]


@pytest.mark.slow
def test_storage_down_while_8_images_finish_and_wait_then_all_succeed(fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine):
    storage = s3_storage_config(moto_s3, outage={"storage_deadline": 180.0}, attempts=3, backoff=0.2, max_backoff=2.0)
    S3Storage(storage).ensure_ready()
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    spool = storage.spool_path
    with (
        ApiServer(app) as api,
        make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage, heartbeat_ttl=2, heartbeat_every=0.3),
    ):
        moto_s3.stop()
        try:
            ids = [_submit(api, prompt=f"a blue circle {i}", steps=3, seed=i) for i in range(8)]
            wait_until(
                lambda: all(_state(redis_conn, i) == "storing" for i in ids), 60, what="all 8 images made and held for storage"
            )
            # Held on the worker's disk (one spool file per image), the jobs still running and ours.
            wait_until(lambda: len(list(spool.glob("*.png"))) == 8, 30, what="8 images in the spool")
            held_at = time.monotonic()
            while time.monotonic() - held_at < HELD_SECONDS:
                assert [_job(api, i)["status"] for i in ids] == ["running"] * 8
                assert all(_state(redis_conn, i) == "storing" for i in ids)
                time.sleep(1)
        finally:
            moto_s3.start()
        results = [_job(api, i, wait=60) for i in ids]
    assert [r["status"] for r in results] == ["succeeded"] * 8, results
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3.endpoint,
        aws_access_key_id=S3_KEYS["s3_access_key"],
        aws_secret_access_key=S3_KEYS["s3_secret_key"],
        region_name="us-east-1",
    )
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=storage.s3_bucket)["Contents"]}
    assert stored >= {f"images/{i}.png" for i in ids}
    for job_id, done in zip(ids, results):
        job = Job.fetch(job_id, connection=redis_conn)
        assert sum(r.type == Result.Type.SUCCESSFUL for r in job.results()) == 1  # computed once, stored once
        assert job.return_value()["storage_tries"] > 1
        assert httpx.get(done["image_url"]).content.startswith(b"\x89PNG")
    assert list(spool.glob("*.png")) == []  # the spool empties once everything is stored
    assert Queue(queue_name, connection=redis_conn).failed_job_registry.count == 0


def test_storage_down_past_the_deadline_fails_through_rq_retries_with_no_internal_address(
    fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine
):
    storage = s3_storage_config(moto_s3, outage={"storage_deadline": 1.5}, attempts=2, backoff=0.1, max_backoff=0.3)
    S3Storage(storage).ensure_ready()
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage, retries=1))
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        moto_s3.stop()
        try:
            job_id = _submit(api, prompt="a red square", steps=2)
            assert Job.fetch(job_id, connection=redis_conn).retries_left == 1
            failed = _job(api, job_id, wait=60)
        finally:
            moto_s3.start()
    assert failed["status"] == "failed" and failed["image_url"] is None
    assert failed["error"]["code"] == "storage_unavailable"
    assert "storage stayed unreachable" in failed["error"]["message"]
    for internal in _internals(storage, moto_s3):
        assert internal not in failed["error"]["message"]
    job = Job.fetch(job_id, connection=redis_conn)
    # RQ's retry path: the job had 1 retry; RQ spent it re-running the job, then failed it.
    assert job.retries_left == 0 and [r.type for r in job.results()] == [Result.Type.FAILED]
    assert list(storage.spool_path.glob("*.png")) == []


def test_a_bucket_deleted_under_a_running_worker_is_created_again(fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine):
    storage = s3_storage_config(moto_s3)
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    s3 = boto3.client(
        "s3", endpoint_url=moto_s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        first = _submit(api, prompt="a red circle", steps=2)
        assert _job(api, first, wait=60)["status"] == "succeeded"
        s3.delete_object(Bucket=storage.s3_bucket, Key=f"images/{first}.png")
        s3.delete_bucket(Bucket=storage.s3_bucket)
        # With no job coming, the worker's maintenance brings it back, and the API is ready again.
        wait_until(
            lambda: httpx.get(f"{api.url}/readyz").status_code == 200,
            30,
            interval=0.2,
            what="the bucket recreated by the idle worker",
        )
        s3.delete_bucket(Bucket=storage.s3_bucket)  # and once more, right before a job's upload
        second = _submit(api, prompt="a green circle", steps=2)
        done = _job(api, second, wait=60)
    assert done["status"] == "succeeded", done
    assert s3.get_object(Bucket=storage.s3_bucket, Key=f"images/{second}.png")["Body"].read().startswith(b"\x89PNG")


def test_a_missing_bucket_the_worker_may_not_create_fails_with_the_documented_message(
    fleet_redis, redis_conn, queue_name, moto_s3, tiny_engine
):
    storage = s3_storage_config(moto_s3, outage={"s3_create_bucket": False})
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage))
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        failed = _job(api, _submit(api, prompt="a red circle", steps=2), wait=60)
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "storage_bucket_missing",
        "field": None,
        "message": ("the storage bucket does not exist and the worker may not create it (SD3SERVE_S3_CREATE_BUCKET=0)"),
    }
    for internal in _internals(storage, moto_s3):
        assert internal not in failed["error"]["message"]


def test_a_full_spool_fails_the_image_for_a_retry_and_holds_nothing(moto_s3, tiny_engine):
    from PIL import Image

    storage = s3_storage_config(moto_s3, outage={"spool_max_bytes": 10, "storage_deadline": 30.0}, attempts=1)
    uploader = DurableUploader(S3Storage(storage), storage, threads=1)
    moto_s3.stop()
    try:
        start = time.monotonic()
        with pytest.raises(StoreFailed) as failure:
            uploader.submit("job-x", Image.new("RGB", (16, 16), "red")).result(timeout=30)
    finally:
        moto_s3.start()
        uploader.shutdown()
    assert time.monotonic() - start < 10  # not held until the deadline: there was no room to hold it
    assert failure.value.code == "storage_unavailable" and failure.value.retry
    assert uploader.spool.bytes == 0 and uploader.waiting == 0
    assert list(storage.spool_path.glob("*")) == []
