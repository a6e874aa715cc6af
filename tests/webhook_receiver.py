"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records every request and
answers from a script (status codes, or "hang" to answer only after a delay)."""

from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # the status we sent, None if the connection was gone first
    at: float


class Receiver:
    """`answers`: statuses for the first requests in order, then `then` for the rest. A negative
    status -s means: wait s seconds before answering 200 (a slow or hanging receiver)."""

    def __init__(self, answers: list[int] | None = None, then: int = 200) -> None:
        self.answers = list(answers or [])
        self.then = then
        self.received: list[Received] = []
        self.release = threading.Event()  # set on exit: held calls are answered at once
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else receiver.then
                    record = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, None, time.time())
                    receiver.received.append(record)
                if status < 0:
                    receiver.release.wait(-status)
                    status = 200
                try:
                    self.send_response(status)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    record.answered = status
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def requests(self, where: Callable[[Received], bool] = lambda r: True) -> list[Received]:
        with self._lock:
            return [r for r in self.received if where(r)]
