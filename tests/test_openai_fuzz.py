"""schemathesis over the routes issue 18 added (OpenAI images and models, the caller's job list,
DELETE, signed files), valid and invalid requests, against a real Redis and a batching worker
with the tiny model (so valid image requests really run): never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api.app import create_app
from engine.request import RequestLimits
from tests.fleet_fixtures import api_config, make_thread_worker
from worker.storage import StorageConfig

KEY = "fuzz-openai-key"
NEW_ROUTES = {
    "POST /v1/images/generations",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /v1/jobs",
    "DELETE /v1/jobs/{job_id}",
    "GET /v1/files/{key}",
}
# Small enough that every valid request finishes in well under a second on the CPU.
LIMITS = RequestLimits(
    min_side=64,
    max_side=64,
    default_width=64,
    default_height=64,
    max_steps=2,
    default_steps=1,
    max_cache_interval=2,
    max_prompt_chars=200,
)


@pytest.fixture(scope="module")
def fuzz_stack(fleet_redis, tiny_engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz-openai")
    storage = StorageConfig(data_dir=str(data))
    queue = "sd3serve-fuzz-openai"
    app = create_app(
        api_config(
            fleet_redis.url,
            queue,
            api_keys=(KEY,),
            limits=LIMITS,
            storage=storage,
            images_timeout=60,
            max_queued=50,
            docs="public",
        )
    )
    with make_thread_worker(tiny_engine, fleet_redis.url, queue, storage):
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("authorized", [True, False])
def test_new_routes_never_answer_a_server_error(fuzz_stack, mode, authorized):
    headers = {"Authorization": f"Bearer {KEY}"} if authorized else {}
    operations = [r.ok() for r in fuzz_stack.get_all_operations()]
    operations = [op for op in operations if op.label in NEW_ROUTES]
    assert {op.label for op in operations} == NEW_ROUTES
    seen: dict[str, set[int]] = {}

    def checker(operation):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20 if authorized else 6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers={**(case.headers or {}), **headers})
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"

        return check

    for operation in operations:
        check = checker(operation)
        try:
            check()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE and not list(operation.iter_parameters()) and not operation.body
    if not authorized:
        assert 401 in seen["POST /v1/images/generations"]
    elif mode == GenerationMode.POSITIVE:
        assert 200 in seen["POST /v1/images/generations"]  # valid bodies really made images
    else:
        assert 400 in seen["POST /v1/images/generations"]
