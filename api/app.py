"""The ASGI app: `uvicorn api.app:app` (configured from SD3SERVE_* variables) or
`create_app(ApiConfig(...))`. Importing this module never imports torch."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.config import ApiConfig
from api.errors import error_body, install_error_handlers
from api.health import build_health_router
from api.image_sweeper import sweep_forever
from api.job_admin_routes import build_job_admin_router
from api.openai_routes import build_openai_router
from api.routes import build_router
from api.state import ApiState
from worker.admission import CappedQueue
from worker.redis_conn import connect
from worker.storage import LocalStorage, storage_from_config

log = logging.getLogger("sd3serve.api")
STATIC_DIR = Path(__file__).resolve().parent / "static"

DESCRIPTION = """Generate images with Stable Diffusion 3 models on a fleet of batching GPU workers.

Submit a job with `POST /v1/jobs`, follow it with `GET /v1/jobs/{id}` (add `?wait=30` to
long-poll), fetch the images from `images`. Errors always look like
`{"error": {"code": ..., "message": ..., "field": ...}}`. OpenAI's SDK works against
`POST /v1/images/generations` and `GET /v1/models`, with OpenAI's error shape there.
"""


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes`, by Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        # Bodies are small (a JSON request): read it all here, at most max_bytes + 1, then replay it.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._reject(scope, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay({"type": "http.request", "body": bytes(body), "more_body": False}, receive), send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        from fastapi.responses import JSONResponse

        from api.openai_errors import OPENAI_PATHS, openai_error

        path = scope.get("path", "")
        if path in ("/v1/jobs", "/v1/images/generations"):
            metrics.JOBS_REJECTED.labels(reason="too_large").inc()
        message = f"the request body exceeds {self.max_bytes} bytes"
        if path.startswith(OPENAI_PATHS):
            response = openai_error(413, message, code="too_large")
        else:
            response = JSONResponse(error_body("too_large", message), status_code=413)
        await response(scope, _no_receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    sent = False

    async def replaying_receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replaying_receive


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(config: ApiConfig | None = None) -> FastAPI:
    config = config or ApiConfig.from_env()
    redis = connect(config.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
    queue = CappedQueue(
        config.queue,
        connection=redis,
        max_queued=config.max_queued,
        wait_replicas=config.redis_wait_replicas,
        wait_timeout_ms=config.redis_wait_timeout_ms,
    )
    state = ApiState(config=config, redis=redis, storage=storage_from_config(config.storage), queue=queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = None
        if isinstance(state.storage, LocalStorage):
            state.storage.ensure_ready()  # the local image folder; S3 buckets are the workers' job
            if config.sweep_interval:
                sweeper = asyncio.create_task(sweep_forever(state.storage, config.result_ttl, config.sweep_interval))
        state.notifier.start()  # wakes long polls and event streams when workers announce a job
        yield
        if sweeper is not None:
            sweeper.cancel()
        await state.notifier.aclose()
        redis.close()

    docs: dict[str, Any] = {} if config.public_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="sd3serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, **docs)
    app.state.api = state  # the one place handlers get their parts from (api/deps.py)
    install_error_handlers(app)
    app.include_router(build_router(config))
    app.include_router(build_health_router())
    app.include_router(build_job_admin_router())
    app.include_router(build_openai_router(config.limits))
    if STATIC_DIR.is_dir():  # the playground page at / (after the API routes, which win)
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="playground")
    metrics.instrument_app(app)
    metrics.register_queue_depth(lambda: state.queue.count, config.queue)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    return app


app = create_app()
