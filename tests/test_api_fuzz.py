"""Property-based fuzzing of the REST API from its own OpenAPI schema (schemathesis): valid and
invalid requests alike, against a real Redis, must never get a 5xx nor a status the schema does
not list.

(schemathesis' pytest fixture loader does not work with this pytest version, so the cases
come from its Hypothesis strategies directly.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

from api.app import create_app
from tests.fleet_fixtures import api_config
from worker.storage import StorageConfig

KEY = "fuzz-key"


@pytest.fixture
def api_schema(fleet_redis, queue_name, tmp_path):
    app = create_app(
        api_config(
            fleet_redis.url,
            queue_name,
            api_keys=(KEY,),
            max_wait=0.3,
            max_queued=50,
            docs="public",
            storage=StorageConfig(data_dir=str(tmp_path)),
        )
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema):
    # POST /v1/images/generations waits for a worker: test_openai_fuzz.py fuzzes it with one running.
    operations = [
        op for op in (result.ok() for result in schema.get_all_operations()) if op.label != "POST /v1/images/generations"
    ]
    assert {op.label for op in operations} >= {
        "POST /v1/jobs",
        "GET /v1/jobs/{job_id}",
        "POST /v1/jobs/{job_id}/cancel",
        "GET /v1/jobs/{job_id}/image",
        "GET /healthz",
        "GET /readyz",
    }
    return operations


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("authorized", [True, False])
def test_fuzzed_requests_never_get_a_server_error(api_schema, mode, authorized):
    headers = {"Authorization": f"Bearer {KEY}"} if authorized else {}
    seen: dict[str, set[int]] = {}
    for operation in _operations(api_schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25 if authorized else 8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers={**(case.headers or {}), **headers})
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
            case.validate_response(response, checks=[status_code_conformance])  # every status is documented

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            assert mode == GenerationMode.NEGATIVE and not list(operation.iter_parameters()) and not operation.body
    codes = set().union(*seen.values())
    assert codes, "no request was made"
    if not authorized:
        assert 401 in codes
    elif mode == GenerationMode.POSITIVE:
        assert 202 in seen["POST /v1/jobs"]  # valid bodies really got through
    else:
        assert 422 in seen["POST /v1/jobs"]
