"""Real parts for the fleet tests: test-owned redis-server processes, a moto S3 server on
loopback, the API served by uvicorn, batching workers in a thread or as `sd3serve worker`
processes. tests/conftest.py registers this module as a plugin, so its fixtures exist once per
session for every test module; modules import only its plain helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.stack_processes import ROOT as REPO, RedisServer, free_port, wait_until

PYTHON = sys.executable
S3_KEYS = {"s3_access_key": "testing", "s3_secret_key": "testing", "s3_region": "us-east-1"}
# Short clocks so a dead worker's jobs come back in seconds (production: heartbeat 30 s, maintenance 15 s).
FAST_CLOCKS = {
    "SD3SERVE_HEARTBEAT_TTL": "2",
    "SD3SERVE_HEARTBEAT_EVERY": "0.3",
    "SD3SERVE_MAINTENANCE_INTERVAL": "1",
    "SD3SERVE_WORKER_TTL": "20",
}


@pytest.fixture(scope="session")
def fleet_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A redis-server for the fleet tests alone (tests use their own queue names on it)."""
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_conn(fleet_redis: RedisServer):
    import redis

    client = redis.Redis.from_url(fleet_redis.url)
    yield client
    client.close()


@pytest.fixture
def queue_name() -> str:
    return f"sd3serve-test-{uuid.uuid4().hex[:8]}"


class MotoS3:
    """moto's S3 in server mode on a loopback port; stop() and start() simulate an outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    s3 = MotoS3()
    s3.start()
    yield s3
    s3.stop()


def s3_storage_config(s3: MotoS3, bucket: str | None = None, outage: dict[str, Any] | None = None, **retry: Any):
    """`outage`: StorageConfig fields for outages (storage_deadline, spool_dir, spool_max_bytes, ...)."""
    import tempfile

    from worker.storage import RetryPolicy, StorageConfig

    outage = {"spool_dir": tempfile.mkdtemp(prefix="sd3serve-spool-"), **(outage or {})}
    return StorageConfig(
        backend="s3",
        s3_endpoint_url=s3.endpoint,
        s3_public_url=s3.endpoint,
        s3_bucket=bucket or f"b-{uuid.uuid4().hex[:10]}",
        retry=RetryPolicy(**retry) if retry else RetryPolicy(attempts=8, backoff=0.2, max_backoff=1.0),
        **S3_KEYS,
        **outage,
    )


# -- the API -----------------------------------------------------------------------------------
class ApiServer:
    """The real app under uvicorn in a background thread, on a loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        wait_until(lambda: self.server.started, 10, what="uvicorn")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def make_client(fleet_redis, queue_name, tmp_path):
    """make(**ApiConfig changes) -> a started TestClient of the API on the fleet's Redis (local
    storage under tmp_path unless `storage` is given); all are closed after the test."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from worker.storage import StorageConfig

    clients = []

    def make(**changes: Any) -> TestClient:
        changes.setdefault("storage", StorageConfig(data_dir=str(tmp_path)))
        test_client = TestClient(create_app(api_config(fleet_redis.url, queue_name, **changes)))
        test_client.__enter__()
        clients.append(test_client)
        return test_client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def api_config(redis_url: str, queue: str, **changes: Any):
    from api.config import ApiConfig
    from engine.request import RequestLimits

    # The tiny model draws 64x64 images in a few steps; these are its defaults.
    changes.setdefault("limits", RequestLimits(default_width=64, default_height=64, default_steps=4))
    return ApiConfig(redis_url=redis_url, queue=queue, **changes)


# -- workers -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """One loaded tiny engine for the in-process (thread) workers; they run one at a time."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    return Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", max_batch=8, admit_per_boundary=4))


class ThreadWorker:
    """A BatchWorker running `work()` in a background thread of the test process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.work(logging_level="WARNING")
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> "ThreadWorker":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.worker._stop_requested = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker thread did not stop"
        if self.error:
            raise self.error


def make_thread_worker(
    engine: Any, redis_url: str, queue: str, storage_config: Any = None, tmp_path: Path | None = None, **changes: Any
) -> ThreadWorker:
    import redis

    from worker.batch_worker import BatchWorker
    from worker.config import WorkerConfig
    from worker.storage import StorageConfig

    if storage_config is None:
        storage_config = StorageConfig(data_dir=str(tmp_path or Path("/tmp")))
    defaults = dict(heartbeat_ttl=3, heartbeat_every=0.5, maintenance_interval=1, progress_every=1, shutdown_grace=5.0)
    defaults.update(changes)
    config = WorkerConfig(redis_url=redis_url, queue=queue, engine=engine.config, storage=storage_config, **defaults)
    worker = BatchWorker([queue], connection=redis.Redis.from_url(redis_url), config=config, engine=engine)
    return ThreadWorker(worker)


def worker_env(model_dir: Path, redis_url: str, queue: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST_CLOCKS)
    env.update(
        {
            "SD3SERVE_REDIS_URL": redis_url,
            "SD3SERVE_QUEUE": queue,
            "SD3SERVE_MODEL": str(model_dir),
            "SD3SERVE_DEVICE": "cpu",
            "SD3SERVE_MAX_BATCH": "8",
            "SD3SERVE_STORAGE": "local",
            "SD3SERVE_DATA_DIR": str(data_dir),
            "SD3SERVE_PROGRESS_EVERY": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """`sd3serve worker` as a child process, its output in a log file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, args: list[str] | None = None, command: list[str] | None = None
    ) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        cmd = command or [PYTHON, "-m", "sd3serve.cli", "worker", *(args or [])]
        self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.redis_url = env["SD3SERVE_REDIS_URL"]
        self.queue = env["SD3SERVE_QUEUE"]

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_registered(self, timeout: float = 60) -> str:
        """Wait until the worker has loaded the model and registered with RQ; returns its name."""
        import redis
        from rq import Worker

        conn = redis.Redis.from_url(self.redis_url)

        def registered() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.output()}")
            for worker in Worker.all(connection=conn):
                if worker.pid == self.pid:
                    return worker.name
            return None

        return wait_until(registered, timeout, interval=0.2, what="worker registration")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@contextmanager
def worker_processes() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.close()


def kill_hard(proc: WorkerProcess) -> None:
    proc.signal(signal.SIGKILL)
    proc.wait(10)
