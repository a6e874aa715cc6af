"""Who is calling: the API-key check every authenticated route depends on."""

from __future__ import annotations

import hmac
from typing import Annotated, Optional

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import metrics
from api.config import ApiConfig
from api.deps import get_config
from api.errors import ApiError
from worker.keys import owner_id

ANONYMOUS = "anonymous"  # every caller's identity when the server has no API keys

bearer = HTTPBearer(auto_error=False, description="An API key, when the server has SD3SERVE_API_KEYS set.")


def authenticate(
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer), config: ApiConfig = Depends(get_config)
) -> str:
    """The caller's owner id (a digest of its API key); ANONYMOUS when the server has no keys."""
    if not config.api_keys:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        metrics.JOBS_REJECTED.labels(reason="unauthorized").inc()
        raise ApiError(
            401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    given = credentials.credentials.encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in config.api_keys):
        metrics.JOBS_REJECTED.labels(reason="forbidden").inc()
        raise ApiError(403, "forbidden", "this API key is not valid")
    return owner_id(credentials.credentials)


Caller = Annotated[str, Depends(authenticate)]
