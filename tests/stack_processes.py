"""Start the stack's processes for tests: a private redis-server, the API and workers through the
images' entrypoint scripts, all on free loopback ports, always stopped afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> bytes:
    """GET `url` until it answers 200; fail early (with the process log) if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s ({last}):\n{tail(log)}")


def tail(log: Path | None, chars: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-chars:]


def base_env(**extra: str) -> dict[str, str]:
    """The environment a container would have: no SD3SERVE_* leaking from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD3SERVE_")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server process owned by one test (or session); can be killed and restarted."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_until(lambda: _pings(redis.Redis(port=self.port)), 10, what=f"redis-server on {self.port}")
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A private redis-server on a free port; yields its URL."""
    server = RedisServer(tmp).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def process(args: list[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen]:
    """Run `args` in its own process group, output to `log`; SIGTERM (then SIGKILL) at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
            proc.wait(10)
    return proc.returncode


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def api_env(redis_url: str, port: int, data_dir: Path, **extra: str) -> dict[str, str]:
    return base_env(
        SD3SERVE_REDIS_URL=redis_url,
        SD3SERVE_API_HOST="127.0.0.1",
        SD3SERVE_API_PORT=str(port),
        SD3SERVE_STORAGE="local",
        SD3SERVE_DATA_DIR=str(data_dir),
        **extra,
    )


def worker_env(redis_url: str, metrics_port: int, data_dir: Path, model: Path, **extra: str) -> dict[str, str]:
    return base_env(
        SD3SERVE_REDIS_URL=redis_url,
        SD3SERVE_METRICS_PORT=str(metrics_port),
        SD3SERVE_STORAGE="local",
        SD3SERVE_DATA_DIR=str(data_dir),
        SD3SERVE_MODEL=str(model),
        SD3SERVE_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        **extra,
    )


class Stack:
    """A running private Redis + API + one worker, started through the images' entrypoints."""

    def __init__(
        self, redis_url: str, api_port: int, metrics_port: int, worker_name: str, api_log: Path, worker_log: Path
    ) -> None:
        self.redis_url = redis_url
        self.api = f"http://127.0.0.1:{api_port}"
        self.worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        self.worker_name = worker_name
        self.api_log = api_log
        self.worker_log = worker_log

    def logs(self) -> str:
        return f"--- api ---\n{tail(self.api_log)}\n--- worker ---\n{tail(self.worker_log)}"


@contextmanager
def running_stack(
    tmp: Path, model: Path, api_env_extra: Mapping[str, str] | None = None, worker_env_extra: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """Redis, the API and a CPU worker sharing a local image folder; all stopped on exit."""
    if not (ROOT / "sd3serve" / "worker_cmd.py").exists():
        import pytest

        pytest.skip("`sd3serve worker` is not built yet (sd3serve/worker_cmd.py)")
    data = tmp / "data"
    api_port, metrics_port = free_port(), free_port()
    worker_name = f"test-worker-{os.getpid()}-{metrics_port}"
    with redis_server(tmp) as redis_url:
        a_env = api_env(redis_url, api_port, data, **dict(api_env_extra or {}))
        w_env = worker_env(redis_url, metrics_port, data, model, SD3SERVE_NAME=worker_name, **dict(worker_env_extra or {}))
        stack = Stack(redis_url, api_port, metrics_port, worker_name, tmp / "api.log", tmp / "worker.log")
        with (
            process(["sh", str(ROOT / "deploy/entrypoint-api.sh")], a_env, stack.api_log) as api_proc,
            process(["sh", str(ROOT / "deploy/entrypoint-worker.sh")], w_env, stack.worker_log) as worker_proc,
        ):
            wait_http(f"{stack.api}/healthz", 60, api_proc, stack.api_log)
            wait_http(stack.worker_metrics, 180, worker_proc, stack.worker_log)
            _wait_worker_registered(redis_url, worker_name, worker_proc, stack.worker_log)
            yield stack
            # Both images' processes stop cleanly on SIGTERM, as `docker stop` / Kubernetes send it.
            worker_proc.send_signal(signal.SIGTERM)
            api_proc.send_signal(signal.SIGTERM)
            assert worker_proc.wait(60) == 0, f"worker exit {worker_proc.returncode}:\n{stack.logs()}"
            # uvicorn shuts down gracefully, then re-raises the signal it caught (exit -15).
            assert api_proc.wait(20) in (0, -signal.SIGTERM), f"API exit {api_proc.returncode}:\n{stack.logs()}"


def _wait_worker_registered(redis_url: str, name: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import redis
    from rq import Worker

    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{tail(log)}")
        if any(w.name == name for w in Worker.all(connection=connection)):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {name} never registered with RQ:\n{tail(log)}")
