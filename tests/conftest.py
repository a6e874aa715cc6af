"""Shared fixtures. Imports nothing heavy at module level: the scheduler tests also run in a
subprocess with torch blocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The fleet's fixtures (Redis server, moto S3, a loaded tiny engine) once per session for every
# module, not once per module that imports them.
pytest_plugins = ["tests.fleet_fixtures"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MAX_SEQUENCE_LENGTH = 16


def _tiny(tmp_path_factory, with_t5: bool) -> Path:
    from engine.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-t5" if with_t5 else "tiny-no-t5") / "pipeline"
    build_tiny_pipeline(path, with_t5=with_t5)
    (path / "sd3serve.json").write_text(
        f'{{"width": 64, "height": 64, "steps": 4, "guidance_scale": 4.0, "max_sequence_length": {TINY_MAX_SEQUENCE_LENGTH}}}'
    )
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random SD3 pipeline with T5, saved in diffusers format (64x64 default, 4 steps)."""
    return _tiny(tmp_path_factory, with_t5=True)


@pytest.fixture(scope="session")
def tiny_model_dir_no_t5(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, with_t5=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis (127.0.0.1:6379 unless SD3SERVE_TEST_REDIS_URL says otherwise)."""
    import redis

    url = os.environ.get("SD3SERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {url}: start it (make test does) or set SD3SERVE_TEST_REDIS_URL")
    return url
