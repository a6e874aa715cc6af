"""The processes of one serving benchmark: a private redis-server, the API under uvicorn and one
worker, each logging to a file in the run's folder, all stopped on exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUEUE = "sd3serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def card_name() -> str:
    """'h200' for an NVIDIA H200, 'cpu' where there is no NVIDIA GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        name = name.decode() if isinstance(name, bytes) else name
        return name.replace("NVIDIA", "").strip().split()[0].lower()
    except Exception:
        return "cpu"


class Stack:
    def __init__(self, work: Path, env: dict[str, str], redis_server: str = "redis-server", api_workers: int = 1) -> None:
        self.work = work
        self.redis_port, self.api_port = free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = dict(
            os.environ,
            **env,
            SD3SERVE_REDIS_URL=self.redis_url,
            SD3SERVE_STORAGE="local",
            SD3SERVE_DATA_DIR=str(work / "data"),
            SD3SERVE_MAX_QUEUED="100000",
            SD3SERVE_QUEUE=QUEUE,
            PYTHONUNBUFFERED="1",
        )
        self.redis_server = redis_server
        self.api_workers = api_workers
        self.processes: dict[str, subprocess.Popen] = {}
        self.worker_name = ""

    def __enter__(self) -> "Stack":
        self._spawn(
            "redis",
            [self.redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        )
        self._wait(lambda: self._redis().ping(), "redis-server", 20)
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--workers",
                str(self.api_workers),
                "--log-level",
                "warning",
            ],
        )
        self._wait(lambda: httpx.get(f"{self.api_url}/readyz", timeout=2).raise_for_status(), "the API", 60)
        return self

    def __exit__(self, *exc) -> None:
        for name in reversed(list(self.processes)):
            self._stop(self.processes[name])

    def start_worker(self, command: list[str], name: str) -> None:
        self.worker_name = f"{name}-{os.getpid()}"
        self._spawn("worker", command, extra_env={"SD3SERVE_NAME": self.worker_name})

    def start_process(self, name: str, command: list[str]) -> None:
        """Another process of the run (stopped with the stack), logging to <name>.log."""
        self._spawn(name, command)

    def wait_for_worker(self, timeout: float) -> None:
        """Until the worker registered with RQ: it has loaded and compiled its model by then."""
        from rq import Worker

        def registered() -> None:
            if not Worker.all(connection=self._redis()):
                raise RuntimeError("no worker yet")

        self._wait(registered, "the worker", timeout, process="worker")

    def mean_batch_size(self, since: float = 0.0) -> float | None:
        """Mean batch of the sd3serve worker's steps since `since` (epoch s), from its step stream."""
        sizes = [step[2] for step in self.steps_since(since)]
        return round(sum(sizes) / len(sizes), 2) if sizes else None

    def steps_since(self, since: float) -> list[list]:
        """The sd3serve worker's steps since `since` (epoch s), from its step stream:
        [seconds after `since`, sub-batch size ("WxH"), batch, host seconds of the step, the device
        steps measured meanwhile as [["WxH", seconds], ...]]. With steps in flight the host
        seconds of a step are mostly its wait for the step before it; the last column is what
        each size cost the device (rows before call h6 lack it)."""
        from worker.keys import step_log_key

        out = []
        for _, f in self._redis().xrange(step_log_key(self.worker_name)):
            at, batch = float(f[b"t"]), int(f[b"batch_size"])
            if at >= since and batch:
                measured = [m.split("=") for m in f.get(b"device", b"").decode().split(";") if m]
                device = [[size, float(seconds)] for size, seconds in measured]
                out.append([round(at - since, 4), f.get(b"size", b"").decode(), batch, float(f[b"step_seconds"]), device])
        return out

    # -- processes -----------------------------------------------------------------------------
    def _redis(self):
        from redis import Redis

        return Redis.from_url(self.redis_url, socket_timeout=5)

    def _spawn(self, name: str, command: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.work / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(self.env, **(extra_env or {}))
        )

    def _wait(self, probe, what: str, timeout: float, process: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe()
                return
            except Exception as exc:
                proc = self.processes.get(process or "")
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{what} exited ({proc.returncode}):\n{self.log_tail(process or '')}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} not ready after {timeout:.0f}s: {exc}") from None
                time.sleep(0.5)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @staticmethod
    def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
