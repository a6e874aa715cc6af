"""Probes and metrics: /healthz, /readyz, /metrics and the authenticated /v1/admin/readiness.

When `SD3SERVE_API_KEYS` is set, nothing here tells the world about the inside: /readyz answers
only `ok` / `not ready` (the reasons go to the log and to /v1/admin/readiness), and /metrics
needs one of `SD3SERVE_ADMIN_KEYS`. Without API keys (a private deployment) all of it is open.
"""

import hmac
import logging
from typing import Any, Optional

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import metrics
from api.deps import Config, RedisConn, Storage
from api.errors import ApiError
from api.schemas import ErrorResponse, Health

log = logging.getLogger("sd3serve.api")
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403)}


admin_bearer = HTTPBearer(auto_error=False, description="An admin key (SD3SERVE_ADMIN_KEYS).")


def readiness_checks(redis: Any, storage: Any) -> dict[str, str]:
    """'ok' or what is wrong, per dependency (these texts may name internal hosts: log only)."""
    checks = {}
    try:
        redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {exc}"
    try:
        storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unreachable: {exc}"
    return checks


def require_admin(config: Config, credentials: Optional[HTTPAuthorizationCredentials] = Depends(admin_bearer)) -> None:
    if not config.api_keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401, "unauthorized", "send an admin key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    given = credentials.credentials.encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in config.admin_keys):
        raise ApiError(403, "forbidden", "this key is not an admin key")


def healthz() -> Any:
    return {"status": "ok", "checks": {}}


def readyz(config: Config, redis: RedisConn, storage: Storage) -> Any:
    checks = readiness_checks(redis, storage)
    ok = all(v == "ok" for v in checks.values())
    if not ok:
        log.warning("not ready: %s", checks)
    if config.api_keys:  # the world learns only whether we are ready
        checks = {}
    body = {"status": "ok" if ok else "not ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


def admin_readiness(redis: RedisConn, storage: Storage, _: None = Depends(require_admin)) -> Any:
    checks = readiness_checks(redis, storage)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


def metrics_endpoint(_: None = Depends(require_admin)) -> Response:
    body, content_type = metrics.render_metrics()
    return Response(body, media_type=content_type)


def build_health_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route(
        "/healthz", healthz, methods=["GET"], response_model=Health, tags=["health"], summary="The process is up"
    )
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Health,
        tags=["health"],
        summary="Redis and storage are reachable",
        responses={503: {"model": Health}},
    )
    router.add_api_route(
        "/v1/admin/readiness",
        admin_readiness,
        methods=["GET"],
        response_model=Health,
        tags=["health"],
        summary="Readiness with each dependency's details (admin key when API keys are set)",
        responses={503: {"model": Health}, **ADMIN_ERRORS},
    )
    router.add_api_route(
        "/metrics", metrics_endpoint, methods=["GET"], tags=["health"], summary="Prometheus metrics", include_in_schema=False
    )
    return router
