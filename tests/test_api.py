"""The REST API against a real Redis, no worker: every 4xx path, idempotency, cancel, limits,
health and the schema. Jobs running end to end are in test_worker_batching.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from api.app import create_app
from engine.request import RequestLimits
from worker import keys
from tests.fleet_fixtures import api_config, free_port

KEY = "s3cret-key"


def _local(tmp_path):
    from worker.storage import StorageConfig

    return StorageConfig(data_dir=str(tmp_path))


def test_importing_the_api_never_imports_torch():
    code = "import sys, api.app, api.routes, worker.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_submit_returns_202_with_id_location_and_queue_position(make_client, redis_conn, queue_name):
    api = make_client()
    first = api.post("/v1/jobs", json={"prompt": "a red circle on a blue background", "seed": 42})
    second = api.post("/v1/jobs", json={"prompt": "a green square on a white background"})
    assert first.status_code == 202, first.text
    body = first.json()
    assert first.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "queued" and body["queue_position"] == 0 and body["seed"] == 42
    assert body["request"]["width"] == 64 and body["progress"] == {"step": 0, "total": 4}
    assert second.json()["queue_position"] == 1
    assert isinstance(second.json()["seed"], int)  # drawn at submission and returned
    assert Queue(queue_name, connection=redis_conn).count == 2
    status = api.get(first.headers["location"])
    assert status.status_code == 200 and status.json()["id"] == body["id"]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"prompt": "x", "width": 100}, "width"),  # not a multiple of 16
        ({"prompt": "x", "height": 4096}, "height"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "cache_interval": 99}, "cache_interval"),
        ({"prompt": "x", "cache_policy": "fastest"}, "cache_policy"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
def test_invalid_fields_get_422_naming_the_field(make_client, redis_conn, queue_name, payload, field):
    response = make_client().post("/v1/jobs", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field
    assert error["message"].startswith(f"{field}:")
    assert Queue(queue_name, connection=redis_conn).count == 0


def test_malformed_json_is_422(make_client):
    response = make_client().post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "body"


def test_configured_limits_change_validation_and_the_schema(make_client):
    api = make_client(limits=RequestLimits(max_side=256, max_steps=10, default_width=64, default_height=64))
    assert api.post("/v1/jobs", json={"prompt": "x", "width": 512}).status_code == 422
    assert api.post("/v1/jobs", json={"prompt": "x", "steps": 11}).json()["error"]["field"] == "steps"
    schema = api.get("/openapi.json").json()["components"]["schemas"]["JobRequest"]["properties"]
    assert schema["width"]["maximum"] == 256 and schema["steps"]["maximum"] == 10
    assert schema["width"]["multipleOf"] == 16


def test_body_over_the_limit_is_413(make_client):
    api = make_client(max_body_bytes=1024)
    big = {"prompt": "x" * 1500}
    assert api.post("/v1/jobs", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(4):
            yield b" " * 400

    response = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


def test_api_keys_401_without_403_wrong_202_right(make_client):
    api = make_client(api_keys=(KEY, "other-key"))
    missing = api.post("/v1/jobs", json={"prompt": "x"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert api.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Basic abc"}).status_code == 401
    wrong = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    ok = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 202
    job = ok.json()["id"]
    assert api.get(f"/v1/jobs/{job}").status_code == 401
    assert api.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert api.get(f"/v1/jobs/{job}", headers={"Authorization": "Bearer other-key"}).status_code == 404  # not its job
    assert api.get("/healthz").status_code == 200  # probes need no key


def test_unknown_job_is_404_everywhere(make_client):
    api = make_client()
    for method, path in [("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel"), ("GET", "/v1/jobs/nope/image")]:
        response = api.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_full_queue_is_429_with_retry_after(make_client, redis_conn, queue_name):
    api = make_client(max_queued=2, retry_after=7)
    assert [api.post("/v1/jobs", json={"prompt": f"p{i}"}).status_code for i in range(2)] == [202, 202]
    refused = api.post("/v1/jobs", json={"prompt": "one too many"})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "queue_full"
    assert Queue(queue_name, connection=redis_conn).count == 2


def test_idempotency_key_returns_the_same_job(make_client, redis_conn, queue_name):
    api = make_client()
    headers = {"Idempotency-Key": "order-17"}
    first = api.post("/v1/jobs", json={"prompt": "a red circle"}, headers=headers)
    again = api.post("/v1/jobs", json={"prompt": "a red circle"}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["seed"] == first.json()["seed"]
    assert again.headers["idempotent-replayed"] == "true"
    assert Queue(queue_name, connection=redis_conn).count == 1
    conflict = api.post("/v1/jobs", json={"prompt": "a blue square"}, headers=headers)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    other = api.post("/v1/jobs", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "order-18"})
    assert other.json()["id"] != first.json()["id"]


def test_an_idempotency_key_whose_job_expired_starts_a_new_job(make_client, redis_conn):
    from rq.job import Job

    api = make_client()
    headers = {"Idempotency-Key": "old-order"}
    first = api.post("/v1/jobs", json={"prompt": "a red circle"}, headers=headers).json()["id"]
    Job.fetch(first, connection=redis_conn).delete()  # its result TTL ran out
    key = keys.idempotency_key("anonymous", "old-order")
    record = json.loads(redis_conn.get(key))
    redis_conn.set(key, json.dumps({**record, "at": record["at"] - 60}), keepttl=True)  # not a race: stale
    second = api.post("/v1/jobs", json={"prompt": "a red circle"}, headers=headers)
    assert second.status_code == 202 and second.json()["id"] != first


def test_idempotency_keys_are_per_api_key(make_client):
    api = make_client(api_keys=("alice", "bob"))
    headers = {"Idempotency-Key": "same"}
    a = api.post("/v1/jobs", json={"prompt": "x"}, headers={**headers, "Authorization": "Bearer alice"})
    b = api.post("/v1/jobs", json={"prompt": "x"}, headers={**headers, "Authorization": "Bearer bob"})
    assert a.json()["id"] != b.json()["id"]


def test_cancel_a_queued_job(make_client, redis_conn, queue_name):
    api = make_client()
    job_id = api.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
    canceled = api.post(f"/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert Queue(queue_name, connection=redis_conn).count == 0
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert api.get(f"/v1/jobs/{job_id}/image").status_code == 409


def test_long_poll_waits_then_answers(make_client):
    api = make_client(max_wait=2)
    job_id = api.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
    start = time.monotonic()
    response = api.get(f"/v1/jobs/{job_id}", params={"wait": 0.6})
    assert 0.5 < time.monotonic() - start < 2 and response.json()["status"] == "queued"
    assert api.get(f"/v1/jobs/{job_id}", params={"wait": 5}).status_code == 422  # over max_wait
    assert api.get(f"/v1/jobs/{job_id}", params={"wait": "soon"}).json()["error"]["field"] == "wait"


def test_health_readiness_and_metrics(make_client, fleet_redis, queue_name, tmp_path):
    api = make_client()
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    api.post("/v1/jobs", json={"prompt": "x"})
    text = api.get("/metrics").text
    assert f'sd3serve_queue_depth{{queue="{queue_name}"}} 1.0' in text
    assert "sd3serve_jobs_submitted_total" in text
    assert 'route="/v1/jobs",status="202"' in text
    assert api.get("/docs").status_code == 200
    playground = api.get("/")
    assert playground.status_code == 200 and playground.headers["content-type"].startswith("text/html")


def test_readiness_fails_when_redis_is_unreachable(tmp_path, queue_name):
    with TestClient(create_app(api_config(f"redis://127.0.0.1:{free_port()}/0", queue_name, storage=_local(tmp_path)))) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
        down = api.post("/v1/jobs", json={"prompt": "x"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
