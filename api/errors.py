"""One error shape for every 4xx/5xx: {"error": {"code", "message", "field"?}}."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sd3serve.api")

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error, **extra}


def _field_of(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or (str(loc[0]) if loc else "request")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        from api import metrics

        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("request",), "msg": "invalid request"}
        field = _field_of(first.get("loc", ()))
        message = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            field, message = "body", "the body is not valid JSON"
        if request.method == "POST" and request.url.path == "/v1/jobs":
            metrics.JOBS_REJECTED.labels(reason="validation").inc()
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse(error_body("invalid_request", f"{field}: {message}", field, detail=detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only 400: a body it could not parse (invalid UTF-8, JSON nested too deeply).
            # Every body error is a documented 422.
            return JSONResponse(
                error_body("invalid_request", "body: the body is not valid JSON (invalid UTF-8 or nested too deeply)", "body"),
                status_code=422,
            )
        code = _HTTP_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis unreachable: %s", exc)
        return JSONResponse(
            error_body("unavailable", "the job queue (Redis) is unreachable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )
