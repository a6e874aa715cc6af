"""Waiting for a job to end, for the long polls (`GET /v1/jobs/{id}?wait=`, the OpenAI route): a
re-read of the job whenever a worker announces that it changed (api/job_notifier.py), and every
`poll` seconds whatever happens, until it has ended, the time is up or the client has gone."""

from __future__ import annotations

import time

import anyio
from fastapi import Request

from api import job_views
from api.state import ApiState
from worker import job_events
from worker.client import JobInfo

POLL_SECONDS = 0.2  # the re-read period without an announcement
WAKES_ON = (job_events.STATUS, job_events.ENDING)  # progress does not end a job


async def until_done(
    state: ApiState, job_id: str, caller: str, seconds: float, request: Request, poll: float = POLL_SECONDS
) -> JobInfo:
    """The caller's job once it has ended, or as it is after `seconds` (or when the client left:
    nobody reads that answer, but the request and its waiter are gone at once)."""
    deadline = time.monotonic() + seconds
    with state.notifier.watch(job_id, WAKES_ON) as watch:  # before the first read: no change goes unseen
        info = await anyio.to_thread.run_sync(job_views.find, state, job_id, caller)
        if info.done or time.monotonic() >= deadline:
            return info
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_cancel_when_client_leaves, request, tasks.cancel_scope)
            while not info.done and time.monotonic() < deadline:
                await watch.wait(min(poll, max(deadline - time.monotonic(), 0.0)))
                info = await anyio.to_thread.run_sync(job_views.find, state, job_id, caller)
            tasks.cancel_scope.cancel()
    return info


async def _cancel_when_client_leaves(request: Request, scope: anyio.CancelScope) -> None:
    # `Request.is_disconnected` never sees a disconnect through the app's http middleware (it
    # polls with a cancelled scope), so wait on the ASGI channel itself, as sse-starlette does.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
