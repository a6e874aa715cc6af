"""FastAPI dependencies: what a route handler needs, read at request time from the one `ApiState`
the app factory (api/app.py) stores on `app.state.api`. Handlers declare these instead of closing
over an app's objects, so they are plain module-level functions.

Each provider takes the `Request` only, so none of them adds anything to the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from redis import Redis

from api.config import ApiConfig
from api.key_limits import KeyLimits
from api.ownership import JobIndex
from api.state import ApiState
from worker.admission import CappedQueue
from worker.signed_urls import UrlSigner


def get_state(request: Request) -> ApiState:
    state = getattr(request.app.state, "api", None)
    if not isinstance(state, ApiState):
        raise RuntimeError("this app has no ApiState at app.state.api; build it with api.app.create_app")
    return state


def get_config(request: Request) -> ApiConfig:
    return get_state(request).config


def get_redis(request: Request) -> Redis:
    return get_state(request).redis


def get_queue(request: Request) -> CappedQueue:
    return get_state(request).queue


def get_storage(request: Request) -> Any:  # worker.storage.LocalStorage or S3Storage
    return get_state(request).storage


def get_key_limits(request: Request) -> KeyLimits:
    return get_state(request).key_limits


def get_jobs(request: Request) -> JobIndex:
    return get_state(request).jobs


def get_urls(request: Request) -> UrlSigner:
    return get_state(request).urls


State = Annotated[ApiState, Depends(get_state)]
Config = Annotated[ApiConfig, Depends(get_config)]
RedisConn = Annotated[Redis, Depends(get_redis)]
Queue = Annotated[CappedQueue, Depends(get_queue)]
Storage = Annotated[Any, Depends(get_storage)]
Limits = Annotated[KeyLimits, Depends(get_key_limits)]
Jobs = Annotated[JobIndex, Depends(get_jobs)]
Urls = Annotated[UrlSigner, Depends(get_urls)]
