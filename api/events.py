"""`GET /v1/jobs/{id}/events`: a job's progress as server-sent events (sse-starlette).

Events: `queued` (`queue_position`), `running` (`step`, `total`), each sent when it changes, and
last an event named by the final status (`succeeded`, `failed`, `canceled`) whose data is the
job's status JSON; then the stream ends. Comment lines every `event_heartbeat` seconds keep
proxies from closing an idle stream; a client that goes away ends the stream at once.

No `from __future__ import annotations`: FastAPI reads the handler's annotations.
"""
import json
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Request
from prometheus_client import Gauge
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.errors import ApiError
from api.schemas import ERRORS, JobId
from worker import contract

STREAMS_OPEN = Gauge("sd3serve_event_streams_open", "Server-sent event streams of jobs being served now.")


def progress_event(info: Any) -> tuple[str, dict[str, Any]]:
    """The (event, data) a job that has not ended is shown as."""
    if info.status == contract.QUEUED:
        return contract.QUEUED, {"id": info.id, "status": contract.QUEUED, "queue_position": info.queue_position}
    return contract.RUNNING, {"id": info.id, "status": contract.RUNNING, **info.progress}


def add_event_routes(router: APIRouter, state: Any, authenticate: Callable[..., str], find: Callable[[str, str], Any],
                     job_response: Callable[[Any, Request], dict[str, Any]]) -> None:

    async def stream(info: Any, request: Request, caller: str) -> AsyncIterator[ServerSentEvent]:
        STREAMS_OPEN.inc()
        try:
            last = None
            while not info.done:
                current = progress_event(info)
                if current != last:
                    last = current
                    yield ServerSentEvent(event=current[0], data=json.dumps(current[1]))
                await anyio.sleep(state.config.event_poll)  # a client that left cancels us here (sse-starlette)
                try:
                    info = await anyio.to_thread.run_sync(find, info.id, caller)
                except ApiError:  # deleted or expired while we watched
                    yield ServerSentEvent(event="error", data=json.dumps(
                        {"id": info.id, "error": {"code": "not_found", "message": "the job no longer exists"}}))
                    return
            body = await anyio.to_thread.run_sync(job_response, info, request)
            yield ServerSentEvent(event=info.status, data=json.dumps(body))
        finally:
            STREAMS_OPEN.dec()

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"], summary="A job's progress as server-sent events",
                response_class=EventSourceResponse,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "queued / running events, then the final status; ends with the job"},
                           **{code: ERRORS[code] for code in (401, 403, 404, 422, 503)}})
    async def job_events(job_id: JobId, request: Request, caller: str = Depends(authenticate)) -> EventSourceResponse:
        info = await anyio.to_thread.run_sync(find, job_id, caller)  # 404 before the stream starts (and for others' jobs)
        return EventSourceResponse(stream(info, request, caller), ping=state.config.event_heartbeat, send_timeout=30,
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
