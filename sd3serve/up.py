"""`sd3serve up`: the embedded stack on one machine — Redis, the API and one batching worker.

Redis: the configured URL when something answers there, otherwise a `redis-server` of our own on
a free port, persisting to <data dir>/redis (append-only file). The API (uvicorn api.app:app) and
the worker (`sd3serve worker`) run as child processes with local image storage under the data
dir. Ctrl-C or SIGTERM stops them all: the worker first (it finishes or requeues its batch),
then the API, then our Redis.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Mapping

from worker.keys import DEFAULT_REDIS_URL


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.ConnectionError, redis.TimeoutError, ValueError):
        return False


class Child:
    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log: Path | None) -> None:
        self.name = name
        self.log_path = log
        self._log: IO[bytes] | None = open(log, "ab") if log else None
        # Own session: Ctrl-C reaches only us, and we stop the children in order. On Linux they
        # also get SIGTERM if we die without cleaning up.
        self.process = subprocess.Popen(
            args,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def tail(self, chars: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return "(output went to the terminal)"


class Stack:
    """Redis (ours or an existing one), the API and one worker; a context manager."""

    def __init__(
        self,
        data_dir: str | Path = ".sd3serve",
        redis_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        env: Mapping[str, str] | None = None,
        quiet: bool = False,
        model: str | None = None,
        device: str | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.redis_url = redis_url or os.environ.get("SD3SERVE_REDIS_URL", DEFAULT_REDIS_URL)
        self.host = host
        self.port = port or free_port()
        self.base_env = dict(os.environ if env is None else env)
        self.quiet = quiet
        if model:  # the API reads the model's defaults too, so both get it
            self.base_env["SD3SERVE_MODEL"] = str(Path(model).resolve()) if Path(model).exists() else model
        if device:
            self.base_env["SD3SERVE_DEVICE"] = device
        self.start_timeout = start_timeout
        self.children: list[Child] = []
        self.own_redis: Child | None = None
        self.interrupted = False  # set from a signal handler: stop waiting for readiness

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log(self, name: str) -> Path | None:
        if not self.quiet:
            return None
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        return self.data_dir / "logs" / f"{name}.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not redis_answers(self.redis_url):
            self._start_redis()
        env = {
            **self.base_env,
            "SD3SERVE_REDIS_URL": self.redis_url,
            "SD3SERVE_STORAGE": "local",
            "SD3SERVE_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        }
        api = [
            sys.executable,
            "-m",
            "uvicorn",
            "api.app:app",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.children.append(Child("api", api, env, self._log("api")))
        worker = [sys.executable, "-m", "sd3serve.cli", "worker"]
        self.children.append(Child("worker", worker, env, self._log("worker")))
        self._wait_ready()

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                f"no Redis answers at {self.redis_url} and redis-server is not installed "
                "(apt-get install redis-server, or pass --redis-url)"
            )
        port = free_port()
        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "", "--appendonly", "yes"]
        self.own_redis = Child("redis", args, self.base_env, self._log("redis") or folder / "redis.log")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_answers(self.redis_url):
            if not self.own_redis.alive() or time.monotonic() > deadline:
                raise StackError(f"redis-server did not start:\n{self.own_redis.tail()}")
            time.sleep(0.05)

    def _wait_ready(self) -> None:
        import redis
        from rq import Worker

        connection = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + self.start_timeout
        api_ready = worker_ready = False
        while not (api_ready and worker_ready):
            self.check_children()
            if self.interrupted:
                raise StackError("interrupted while starting")
            if time.monotonic() > deadline:
                raise StackError(f"the stack was not ready after {self.start_timeout:.0f}s")
            if not api_ready:
                api_ready = _http_ok(f"{self.url}/readyz")
            if not worker_ready:
                pid = self.children[1].process.pid
                worker_ready = any(w.pid == pid for w in Worker.all(connection=connection))
            time.sleep(0.2)

    def check_children(self) -> None:
        for child in [*self.children, *([self.own_redis] if self.own_redis else [])]:
            if not child.alive():
                raise StackError(f"{child.name} exited with code {child.process.returncode}:\n{child.tail()}")

    def stop(self) -> None:
        for child in reversed(self.children):  # the worker first: it finishes or requeues its batch
            child.stop(timeout=90 if child.name == "worker" else 15)
        self.children = []
        if self.own_redis is not None:
            self.own_redis.stop(timeout=15)  # SIGTERM: Redis flushes its append-only file
            self.own_redis = None


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SD3SERVE_DATA_DIR", ".sd3serve"),
        help="images, logs and our Redis' data go here (default .sd3serve)",
    )
    parser.add_argument("--redis-url", help="use this Redis; when nothing answers there, start our own")
    parser.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default 8000; 0 picks a free one)")
    parser.add_argument("--model", help="model folder for the worker (default: the reference model)")
    parser.add_argument("--device", help="the worker's device: cpu, cuda, ... (default auto)")
    parser.add_argument("--quiet", action="store_true", help="children's output to <data dir>/logs instead")


def run(args: argparse.Namespace) -> int:
    stack = Stack(
        args.data_dir,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        quiet=args.quiet,
        model=args.model,
        device=args.device,
    )

    def request_stop(signum: int, frame: object) -> None:
        stack.interrupted = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print("starting Redis, the API and a worker (loading the model)...", flush=True)
        stack.start()
        print(f"sd3serve is up: {stack.url}  (API docs {stack.url}/docs, Redis {stack.redis_url})", flush=True)
        print(
            f"try: curl -X POST {stack.url}/v1/jobs -H 'content-type: application/json' "
            '-d \'{"prompt": "a red circle on a blue background"}\'',
            flush=True,
        )
        print("Ctrl-C stops everything.", flush=True)
        while not stack.interrupted:
            stack.check_children()
            time.sleep(0.5)
        print("stopping...", flush=True)
        return 0
    except StackError as exc:
        if stack.interrupted:
            print("interrupted; stopped", file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
