"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, on the OpenAI-compatible
routes: a route class that turns every error raised in them (validation, auth, limits) into it."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from api.errors import ApiError

log = logging.getLogger("sd3serve.api")
OPENAI_PATHS = ("/v1/images/", "/v1/models")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}
_CODES = {"unauthorized": "invalid_api_key", "forbidden": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


class OpenAIRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                first = (exc.errors() or [{"loc": ("body",), "msg": "invalid request"}])[0]
                param: str | None = _param(first.get("loc", ()))
                message = first.get("msg", "invalid value")
                if first.get("type") == "json_invalid":
                    param, message = None, "the body is not valid JSON"
                return openai_error(400, f"{param}: {message}" if param else message, param, "invalid_value")
            except ApiError as exc:
                status = 400 if exc.status == 422 else exc.status
                return openai_error(status, exc.message, exc.field, _CODES.get(exc.code, exc.code), exc.headers)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.error("Redis unreachable: %s", exc)
                return openai_error(
                    503, "the job queue (Redis) is unreachable; retry shortly", code="unavailable", headers={"Retry-After": "5"}
                )

        return openai_handler
