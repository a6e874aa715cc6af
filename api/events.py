"""`GET /v1/jobs/{id}/events`: a job's progress as server-sent events (sse-starlette).

Events: `queued` (`queue_position`), `running` (`step`, `total`), each sent when it changes, and
last an event named by the final status (`succeeded`, `failed`, `canceled`) whose data is the
job's status JSON; then the stream ends. The job is re-read whenever a worker announces a change
(api/job_notifier.py) and at least every `event_poll` seconds. Comment lines every
`event_heartbeat` seconds keep proxies from closing an idle stream; a client that goes away ends
the stream at once.

No `from __future__ import annotations`: FastAPI reads the handler's annotations.
"""

import json
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Request
from prometheus_client import Gauge
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import job_views
from api.auth import Caller
from api.deps import State
from api.errors import ApiError
from api.schemas import ERRORS, JobId
from api.state import ApiState
from worker import contract

STREAMS_OPEN = Gauge("sd3serve_event_streams_open", "Server-sent event streams of jobs being served now.")


def progress_event(info: Any) -> tuple[str, dict[str, Any]]:
    """The (event, data) a job that has not ended is shown as."""
    if info.status == contract.QUEUED:
        return contract.QUEUED, {"id": info.id, "status": contract.QUEUED, "queue_position": info.queue_position}
    return contract.RUNNING, {"id": info.id, "status": contract.RUNNING, **info.progress}


async def stream(state: ApiState, info: Any, request: Request, caller: str) -> AsyncIterator[ServerSentEvent]:
    STREAMS_OPEN.inc()
    try:
        with state.notifier.watch(info.id) as watch:
            last = None
            while not info.done:
                current = progress_event(info)
                if current != last:
                    last = current
                    yield ServerSentEvent(event=current[0], data=json.dumps(current[1]))
                await watch.wait(state.config.event_poll)  # a client that left cancels us here (sse-starlette)
                try:
                    info = await anyio.to_thread.run_sync(job_views.find, state, info.id, caller)
                except ApiError:  # deleted or expired while we watched
                    yield ServerSentEvent(
                        event="error",
                        data=json.dumps({"id": info.id, "error": {"code": "not_found", "message": "the job no longer exists"}}),
                    )
                    return
        body = await anyio.to_thread.run_sync(job_views.job_response, state, info, request)
        yield ServerSentEvent(event=info.status, data=json.dumps(body))
    finally:
        STREAMS_OPEN.dec()


async def job_events(job_id: JobId, request: Request, state: State, caller: Caller) -> EventSourceResponse:
    # 404 before the stream starts (and for others' jobs)
    info = await anyio.to_thread.run_sync(job_views.find, state, job_id, caller)
    return EventSourceResponse(
        stream(state, info, request, caller),
        ping=state.config.event_heartbeat,
        send_timeout=30,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def add_event_routes(router: APIRouter) -> None:
    router.add_api_route(
        "/v1/jobs/{job_id}/events",
        job_events,
        methods=["GET"],
        tags=["jobs"],
        summary="A job's progress as server-sent events",
        response_class=EventSourceResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "queued / running events, then the final status; ends with the job",
            },
            **{code: ERRORS[code] for code in (401, 403, 404, 422, 503)},
        },
    )
