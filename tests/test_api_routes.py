"""The route handlers are module-level functions fed by FastAPI dependencies (api/deps.py), and
the schema kept every operation it had when they were closures inside router factories."""

from __future__ import annotations

import inspect
import sys

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.auth import ANONYMOUS
from api.endpoint import specialize
from api.errors import ApiError
from api.health import build_health_router, healthz
from api.openai_routes import get_model, list_models
from api.routes import create_job, get_job
from api.state import ApiState
from tests.fleet_fixtures import api_config
from worker.admission import CappedQueue
from worker.storage import LocalStorage

# (method, path, operation id) of every operation, as app.openapi() listed them on main before the
# handlers became module-level functions (commit 523f4e2).
OPERATIONS = [
    ("GET", "/healthz", "healthz_healthz_get"),
    ("GET", "/readyz", "readyz_readyz_get"),
    ("GET", "/v1/admin/readiness", "admin_readiness_v1_admin_readiness_get"),
    ("GET", "/v1/files/{key}", "get_file_v1_files__key__get"),
    ("POST", "/v1/images/generations", "create_images_v1_images_generations_post"),
    ("GET", "/v1/jobs", "list_jobs_v1_jobs_get"),
    ("POST", "/v1/jobs", "create_job_v1_jobs_post"),
    ("DELETE", "/v1/jobs/{job_id}", "delete_job_v1_jobs__job_id__delete"),
    ("GET", "/v1/jobs/{job_id}", "get_job_v1_jobs__job_id__get"),
    ("POST", "/v1/jobs/{job_id}/cancel", "cancel_job_v1_jobs__job_id__cancel_post"),
    ("GET", "/v1/jobs/{job_id}/events", "job_events_v1_jobs__job_id__events_get"),
    ("GET", "/v1/jobs/{job_id}/image", "get_image_v1_jobs__job_id__image_get"),
    ("GET", "/v1/models", "list_models_v1_models_get"),
    ("GET", "/v1/models/{model}", "get_model_v1_models__model__get"),
]


def _flatten(routes: list) -> list[APIRoute]:
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers by reference
            found += _flatten(route.original_router.routes)
    return found


def test_the_schema_has_every_operation_it_had(make_client):
    schema = make_client().app.openapi()
    operations = sorted(
        (method.upper(), path, op["operationId"]) for path, methods in schema["paths"].items() for method, op in methods.items()
    )
    assert operations == sorted(OPERATIONS)


def test_every_route_handler_is_a_module_level_function(make_client):
    routes = _flatten(make_client().app.routes)
    assert sorted(route.name for route in routes) == sorted(
        [op_id.split("_" + path.strip("/").split("/")[0])[0] for _, path, op_id in OPERATIONS] + ["metrics_endpoint"]
    )
    for route in routes:
        handler = inspect.unwrap(route.endpoint)
        assert "<locals>" not in handler.__qualname__, f"{route.path}: {handler.__qualname__} is a closure"
        assert getattr(sys.modules[handler.__module__], handler.__name__) is handler, route.path


def test_handlers_are_plain_functions_called_with_their_dependencies(fleet_redis, redis_conn, queue_name, tmp_path):
    config = api_config(fleet_redis.url, queue_name)
    state = ApiState(
        config=config,
        redis=redis_conn,
        storage=LocalStorage(tmp_path),
        queue=CappedQueue(queue_name, connection=redis_conn, max_queued=0),
    )
    assert healthz() == {"status": "ok", "checks": {}}
    card = {"id": config.served_model, "object": "model", "created": state.started, "owned_by": "sd3serve"}
    assert list_models(state, ANONYMOUS) == {"object": "list", "data": [card]}
    assert get_model(config.served_model, state, ANONYMOUS) == card
    with pytest.raises(ApiError) as missing:
        get_model("dall-e-3", state, ANONYMOUS)
    assert missing.value.status == 404 and missing.value.code == "model_not_found"


def test_each_app_gets_its_own_wait_bound_and_request_model(make_client):
    short, long = make_client(max_wait=5), make_client(max_wait=90)
    for api, bound in ((short, 5), (long, 90)):
        params = api.app.openapi()["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]
        assert [p["schema"]["maximum"] for p in params if p["name"] == "wait"] == [bound]
    too_long = short.get("/v1/jobs/abc", params={"wait": 6})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "wait"
    assert long.get("/v1/jobs/abc", params={"wait": 6}).status_code == 404  # 6 s is within this app's bound
    # the module-level handlers keep their own, unspecialized signatures
    assert inspect.signature(get_job).parameters["wait"].annotation is float
    assert inspect.signature(create_job).parameters["body"].annotation.__name__ == "BaseModel"


def test_specialize_rejects_a_parameter_the_handler_lacks():
    with pytest.raises(ValueError, match="get_job has no parameter"):
        specialize(get_job, body=int)


def test_a_route_in_an_app_without_its_state_says_so():
    app = FastAPI()
    app.include_router(build_health_router())
    with TestClient(app) as api, pytest.raises(RuntimeError, match="no ApiState at app.state.api"):
        api.get("/readyz")
