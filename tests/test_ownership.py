"""Jobs belong to the key that made them (keys A and B on a live stack: the API under uvicorn, a
batching worker, local storage and moto's S3), `GET /v1/jobs` lists the caller's own, `DELETE`
removes the job and its images, and per-key limits answer 429 with Retry-After."""

from __future__ import annotations

import os
import time
import uuid

import boto3
import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.image_sweeper import sweep
from tests.fleet_fixtures import ApiServer, S3_KEYS, api_config, make_thread_worker, s3_storage_config
from worker.s3_lifecycle import RULE_ID
from worker.storage import LocalStorage, S3Storage, StorageConfig


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _run(api: ApiServer, key: str, **fields) -> dict:
    created = httpx.post(f"{api.url}/v1/jobs", json={"prompt": "a red circle", "steps": 2, **fields}, headers=_auth(key))
    assert created.status_code == 202, created.text
    done = httpx.get(f"{api.url}/v1/jobs/{created.json()['id']}", params={"wait": 60}, headers=_auth(key), timeout=70)
    assert done.json()["status"] == "succeeded", done.text
    return done.json()


def _new_keys() -> tuple[str, str]:
    """Keys A and B new to this test: owners' job lists and limits live in the session's Redis."""
    return f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"


@pytest.fixture
def local_stack(fleet_redis, tiny_engine, queue_name, tmp_path):
    storage = StorageConfig(data_dir=str(tmp_path))
    keys = _new_keys()
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage, api_keys=keys))
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        api.keys = keys
        yield api


def test_another_key_gets_404_for_status_cancel_image_and_delete(local_stack, tmp_path):
    api = local_stack
    A, B = api.keys
    job = _run(api, A)
    job_id = job["id"]
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/image"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        as_b = httpx.request(method, f"{api.url}{path}", headers=_auth(B))
        assert as_b.status_code == 404, (method, path, as_b.text)
        assert as_b.json()["error"]["message"] == f"no job with id {job_id!r}"  # same as a job that never existed
    assert httpx.get(f"{api.url}/v1/jobs/{job_id}/image", headers=_auth(A)).status_code == 200
    assert (tmp_path / "images" / f"{job_id}.png").exists()  # B's DELETE did nothing


def test_list_shows_each_key_its_own_jobs_newest_first_paginated(local_stack):
    api = local_stack
    A, B = api.keys
    mine = [_run(api, A, seed=i)["id"] for i in range(3)]
    theirs = _run(api, B)["id"]
    first = httpx.get(f"{api.url}/v1/jobs", params={"limit": 2}, headers=_auth(A)).json()
    assert [j["id"] for j in first["data"]] == [mine[2], mine[1]] and first["next_cursor"]
    second = httpx.get(f"{api.url}/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}, headers=_auth(A)).json()
    assert [j["id"] for j in second["data"]] == [mine[0]] and second["next_cursor"] is None
    assert all(j["status"] == "succeeded" and j["images"] for j in first["data"] + second["data"])
    b_list = httpx.get(f"{api.url}/v1/jobs", headers=_auth(B)).json()
    assert [j["id"] for j in b_list["data"]] == [theirs]
    bad = httpx.get(f"{api.url}/v1/jobs", params={"cursor": "drop table"}, headers=_auth(A))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"


def test_delete_removes_the_job_and_its_image_files(local_stack, tmp_path, redis_conn):
    api = local_stack
    A, B = api.keys
    job = _run(api, A, n=2, output_format="jpeg")
    job_id = job["id"]
    files = [tmp_path / "images" / f"{job_id}.jpeg", tmp_path / "images" / f"{job_id}-1.jpeg"]
    assert all(f.exists() for f in files)
    url = job["images"][1]
    assert httpx.get(url).status_code == 200
    deleted = httpx.delete(f"{api.url}/v1/jobs/{job_id}", headers=_auth(A))
    assert deleted.status_code == 204
    assert not any(f.exists() for f in files)
    assert httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=_auth(A)).status_code == 404
    assert httpx.get(url).status_code == 404  # a still-valid signed URL finds nothing
    assert not redis_conn.exists(f"rq:job:{job_id}")
    assert job_id not in [j["id"] for j in httpx.get(f"{api.url}/v1/jobs", headers=_auth(A)).json()["data"]]


def test_delete_removes_the_s3_object(fleet_redis, tiny_engine, queue_name, moto_s3):
    storage = s3_storage_config(moto_s3)
    A, B = _new_keys()
    app = create_app(api_config(fleet_redis.url, queue_name, storage=storage, api_keys=(A, B)))
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3.endpoint,
        aws_access_key_id=S3_KEYS["s3_access_key"],
        aws_secret_access_key=S3_KEYS["s3_secret_key"],
        region_name="us-east-1",
    )
    with ApiServer(app) as api, make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage):
        job = _run(api, A)
        key = f"images/{job['id']}.png"
        assert s3.head_object(Bucket=storage.s3_bucket, Key=key)["ContentLength"] > 0
        assert httpx.get(job["image_url"]).status_code == 200  # presigned
        assert httpx.delete(f"{api.url}/v1/jobs/{job['id']}", headers=_auth(B)).status_code == 404
        assert httpx.delete(f"{api.url}/v1/jobs/{job['id']}", headers=_auth(A)).status_code == 204
    listed = s3.list_objects_v2(Bucket=storage.s3_bucket, Prefix="images/").get("Contents", [])
    assert key not in [o["Key"] for o in listed]
    # The worker's ensure_ready put the expiry rule on the bucket it created.
    rules = s3.get_bucket_lifecycle_configuration(Bucket=storage.s3_bucket)["Rules"]
    assert [(r["ID"], r["Expiration"]["Days"], r["Filter"]["Prefix"]) for r in rules] == [(RULE_ID, 1, "images/")]


def test_expiry_rule_keeps_the_buckets_other_rules(moto_s3):
    config = s3_storage_config(moto_s3)
    s3 = boto3.client(
        "s3", endpoint_url=moto_s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket=config.s3_bucket)
    other = {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=config.s3_bucket, LifecycleConfiguration={"Rules": [other]})
    S3Storage(StorageConfig(**{**config.__dict__, "s3_expire_days": 2})).ensure_ready()
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=config.s3_bucket)["Rules"]}
    assert set(rules) == {"logs", RULE_ID}
    assert rules[RULE_ID]["Expiration"]["Days"] == 2 and rules["logs"]["Expiration"]["Days"] == 30


def test_sweeper_deletes_images_older_than_the_result_ttl(tmp_path):
    storage = LocalStorage(tmp_path)
    old, new, part = tmp_path / "old.png", tmp_path / "new.webp", tmp_path / "x.png.part"
    for path in (old, new, part):
        path.write_bytes(b"image")
    now = time.time()
    os.utime(old, (now - 7200, now - 7200))
    os.utime(part, (now - 7200, now - 7200))
    removed = sweep(storage, max_age=3600, now=now)
    assert sorted(removed) == sorted([old, part]) and new.exists() and not old.exists()


@pytest.fixture
def limited_api(fleet_redis, queue_name, tmp_path):
    """Apps whose keys are new to this test (the limits' counters live in the session's Redis)."""
    keys = (f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}")

    def make(**limits) -> TestClient:
        config = api_config(fleet_redis.url, queue_name, storage=StorageConfig(data_dir=str(tmp_path)), api_keys=keys, **limits)
        return TestClient(create_app(config))

    make.keys = keys
    return make


def test_key_over_its_per_minute_limit_gets_429_with_retry_after_others_still_served(limited_api):
    ka, kb = limited_api.keys
    per_minute = 3
    with limited_api(requests_per_minute=per_minute) as api:
        for _ in range(per_minute):
            assert api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 202
        over = api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka))
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(over.headers["retry-after"]) <= 60
        assert api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(kb)).status_code == 202
        # The OpenAI route counts against the same budget and answers in OpenAI's shape.
        images = api.post("/v1/images/generations", json={"prompt": "x"}, headers=_auth(ka))
        assert images.status_code == 429 and images.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(images.headers["retry-after"]) >= 1
        # Reading is not limited.
        assert api.get("/v1/jobs", headers=_auth(ka)).status_code == 200


def test_per_minute_limit_is_shared_by_api_replicas(limited_api):
    ka, kb = limited_api.keys
    with limited_api(requests_per_minute=2) as one, limited_api(requests_per_minute=2) as two:
        assert one.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 202
        assert two.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 202
        assert one.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 429
        assert two.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 429


def test_jobs_in_flight_limit_frees_up_when_a_job_ends(limited_api):
    ka, kb = limited_api.keys
    with limited_api(max_jobs_in_flight=2) as api:
        ids = [api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).json()["id"] for _ in range(2)]
        over = api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka))
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_jobs"
        assert over.headers["retry-after"]
        assert api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(kb)).status_code == 202
        assert api.post(f"/v1/jobs/{ids[0]}/cancel", headers=_auth(ka)).status_code == 200
        assert api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 202
        assert api.post("/v1/jobs", json={"prompt": "x"}, headers=_auth(ka)).status_code == 429


def test_openai_sdk_sees_429_as_rate_limit_error(fleet_redis, queue_name, tmp_path):
    key = f"sdk-{uuid.uuid4().hex}"
    config = api_config(
        fleet_redis.url,
        queue_name,
        storage=StorageConfig(data_dir=str(tmp_path)),
        api_keys=(key,),
        requests_per_minute=1,
        images_timeout=0.2,
    )
    with ApiServer(create_app(config)) as api:
        sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as first:  # no worker: the first waits out its timeout
            sdk.images.generate(prompt="x")
        assert first.value.status_code == 504
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.images.generate(prompt="x")
        assert int(caught.value.response.headers["retry-after"]) >= 1
