"""Issue 19 at the API: admission that cannot overshoot the cap (many clients, two API replicas),
strict types, every body error a 422, job ids in the API's own format, and no internals shown to
the world when API keys are set. Real Redis, real uvicorn servers, no worker."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from rq import Queue

from api.app import create_app
from tests.fleet_fixtures import ApiServer, api_config, free_port
from worker.storage import StorageConfig

KEY, ADMIN = "user-key", "admin-key"
CAP, CLIENTS, POSTS = 50, 20, 10


@pytest.mark.parametrize("run", range(3))
def test_twenty_clients_posting_at_once_never_overshoot_the_cap(fleet_redis, redis_conn, queue_name, tmp_path, run):
    """20 clients × 10 posts, cap 50, no worker, over two API replicas sharing the Redis:
    exactly 50 accepted and 150 refused with 429."""
    config = api_config(fleet_redis.url, queue_name, max_queued=CAP, storage=StorageConfig(data_dir=str(tmp_path)))
    with ApiServer(create_app(config)) as first, ApiServer(create_app(config)) as second:
        start = threading.Barrier(CLIENTS)

        def client(index: int) -> list[int]:
            base = (first, second)[index % 2].url
            with httpx.Client(base_url=base, timeout=30) as http:
                start.wait(10)
                return [http.post("/v1/jobs", json={"prompt": f"client {index} post {p}"}).status_code for p in range(POSTS)]

        with ThreadPoolExecutor(CLIENTS) as pool:
            codes = [code for codes in pool.map(client, range(CLIENTS)) for code in codes]
    assert codes.count(202) == CAP and codes.count(429) == CLIENTS * POSTS - CAP, sorted(set(codes))
    assert Queue(queue_name, connection=redis_conn).count == CAP


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", True),
        ("steps", "4"),
        ("steps", 4.0),
        ("guidance_scale", True),
        ("guidance_scale", "5"),
        ("width", "64"),
        ("height", False),
        ("seed", "7"),
        ("cache_interval", "1"),
        ("prompt", 5),
    ],
)
def test_strings_booleans_and_floats_are_not_integers(make_client, redis_conn, queue_name, field, value):
    payload = {"prompt": "a red circle", field: value}
    response = make_client().post("/v1/jobs", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field and response.json()["error"]["message"].startswith(field)
    assert Queue(queue_name, connection=redis_conn).count == 0


def test_a_float_field_still_takes_an_integer(make_client):
    response = make_client().post("/v1/jobs", json={"prompt": "x", "guidance_scale": 5})
    assert response.status_code == 202 and response.json()["request"]["guidance_scale"] == 5.0


def test_the_engine_applies_the_same_rules():
    from engine.request import RequestValidationError, validate_request

    for field, value in [("steps", True), ("width", "64"), ("steps", 4.0), ("guidance_scale", "5")]:
        with pytest.raises(RequestValidationError) as error:
            validate_request({"prompt": "x", field: value})
        assert error.value.field == field


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "\xff\xfe invalid utf-8"}',
        b"[" * 1000 + b"]" * 1000,
        b'{"prompt": "x", "seed": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    ],
)
def test_unparseable_bodies_are_422(make_client, body):
    response = make_client().post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and response.json()["error"]["field"] == "body"


def test_an_empty_idempotency_key_is_422(make_client, redis_conn, queue_name):
    response = make_client().post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": ""})
    assert response.status_code == 422 and response.json()["error"]["field"] == "Idempotency-Key"
    assert Queue(queue_name, connection=redis_conn).count == 0


def test_job_ids_have_no_aliases(make_client):
    api = make_client()
    job_id = api.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200
    for alias in (f"{job_id}:anything", f"{job_id}:", "a b", "x" * 129):
        for method, path in [
            ("GET", f"/v1/jobs/{alias}"),
            ("POST", f"/v1/jobs/{alias}/cancel"),
            ("GET", f"/v1/jobs/{alias}/image"),
        ]:
            response = api.request(method, path)
            assert response.status_code == 422 and response.json()["error"]["field"] == "job_id", (path, response.text)
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the cancel attempts did nothing


def test_keys_set_hide_metrics_readiness_details_and_docs(make_client):
    api = make_client(api_keys=(KEY,), admin_keys=(ADMIN,))
    user, admin = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers=user).status_code == 403  # a user key is not an admin key
    metrics = api.get("/metrics", headers=admin)
    assert metrics.status_code == 200 and "sd3serve_jobs_submitted_total" in metrics.text
    assert api.get("/readyz").json() == {"status": "ok", "checks": {}}
    assert api.get("/v1/admin/readiness").status_code == 401
    assert api.get("/v1/admin/readiness", headers=admin).json()["checks"] == {"redis": "ok", "storage": "ok"}
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert api.get(path).status_code == 404, path
    assert api.get("/healthz").status_code == 200  # probes still need no key
    public = make_client(api_keys=(KEY,), docs="public")
    assert public.get("/openapi.json").status_code == 200 and public.get("/docs").status_code == 200


def test_unready_with_keys_set_says_only_not_ready(tmp_path, queue_name):
    port = free_port()
    config = api_config(
        f"redis://127.0.0.1:{port}/0",
        queue_name,
        api_keys=(KEY,),
        admin_keys=(ADMIN,),
        storage=StorageConfig(data_dir=str(tmp_path)),
    )
    with TestClient(create_app(config)) as api:
        ready = api.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready", "checks": {}}
        assert str(port) not in ready.text and "127.0.0.1" not in ready.text
        details = api.get("/v1/admin/readiness", headers={"Authorization": f"Bearer {ADMIN}"})
        assert details.status_code == 503 and details.json()["checks"]["redis"].startswith("unreachable")
        down = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert down.status_code == 503 and str(port) not in down.text


def test_without_keys_everything_stays_open(make_client):
    api = make_client()
    assert api.get("/metrics").status_code == 200 and api.get("/docs").status_code == 200
    assert api.get("/v1/admin/readiness").json()["checks"] == {"redis": "ok", "storage": "ok"}


def test_the_schema_lists_503_and_no_400(make_client):
    spec = make_client().get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        if path.startswith(("/v1/images/", "/v1/models")):
            continue  # the OpenAI-compatible routes answer bad requests with OpenAI's own 400
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "400" not in codes, (method, path)
            if path.startswith("/v1/jobs"):
                assert {"422", "503"} <= codes, (method, path)
    job_id = next(p for p in spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "job_id")
    assert ":" not in job_id["schema"]["pattern"] and job_id["schema"]["pattern"].startswith("^")


def test_wait_for_a_replica_that_is_not_there_is_503_and_the_job_never_runs(make_client, redis_conn, queue_name):
    """A single Redis has no replica: with SD3SERVE_REDIS_WAIT_REPLICAS=1 nothing gets a 202. A job
    sent without an Idempotency-Key is taken back; with one it stays, and the retry gets it."""
    api = make_client(redis_wait_replicas=1, redis_wait_timeout_ms=50)
    plain = api.post("/v1/jobs", json={"prompt": "x"})
    assert plain.status_code == 503 and plain.headers["retry-after"]
    assert plain.json()["error"]["code"] == "unavailable"
    assert Queue(queue_name, connection=redis_conn).count == 0
    keyed = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
    again = api.post("/v1/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
    assert keyed.status_code == again.status_code == 503
    assert Queue(queue_name, connection=redis_conn).count == 1  # one job, kept for the retry
