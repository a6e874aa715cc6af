"""The API's frozen configuration, from SD3SERVE_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from engine.config import REFERENCE_MODEL_DIR, limits_for_model, limits_from_env
from engine.request import RequestLimits
from engine.settings import env_values
from worker.client import DEFAULT_FAILURE_TTL, DEFAULT_JOB_TIMEOUT, DEFAULT_RESULT_TTL, DEFAULT_RETRIES, JobOptions
from worker.keys import DEFAULT_QUEUE, DEFAULT_REDIS_URL
from worker.redis_conn import redis_url_from_env
from worker.storage import StorageConfig
from worker.webhook_config import WebhookConfig


@dataclass(frozen=True)
class ApiConfig:
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    api_keys: tuple[str, ...] = ()  # SD3SERVE_API_KEYS=key1,key2; empty: no authentication
    # With API keys set: keys for /metrics and /v1/admin/readiness (empty: those answer 401/403 to all).
    admin_keys: tuple[str, ...] = ()
    docs: str = "auto"  # /docs and /openapi.json: public | off | auto (public unless API keys are set)
    # After enqueueing, wait until this many replicas have the job before answering 202 (0: off).
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    max_queued: int = 1000  # queued jobs past which POST /v1/jobs answers 429
    retry_after: int = 5  # seconds, in the Retry-After header of a 429
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    max_wait: float = 60.0  # longest ?wait= long poll, seconds
    job_timeout: int = DEFAULT_JOB_TIMEOUT
    result_ttl: int = DEFAULT_RESULT_TTL
    failure_ttl: int = DEFAULT_FAILURE_TTL
    retries: int = DEFAULT_RETRIES
    idempotency_ttl: int = 24 * 3600  # how long an Idempotency-Key is remembered
    public_url: str = ""  # base of URLs handed out; empty: the URL the request came in on
    requests_per_minute: int = 0  # per API key, submissions (POST /v1/jobs, /v1/images/generations); 0: no limit
    max_jobs_in_flight: int = 0  # per API key, jobs queued or running at once; 0: no limit
    url_signing_key: str = ""  # HMAC secret of local image URLs; empty: one drawn once and kept in Redis
    image_url_ttl: int = 3600  # seconds a signed local image URL stays valid
    sweep_interval: float = 300.0  # seconds between sweeps of expired local images; 0: no sweeper
    model_name: str = ""  # the served model's name in /v1/models; empty: the model folder's name
    images_timeout: float = 300.0  # POST /v1/images/generations waits this long, then 504 with the job id
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)  # SD3SERVE_WEBHOOK_*: submit-time checks
    event_heartbeat: float = 15.0  # seconds between comment lines on an idle event stream
    event_poll: float = 0.25  # seconds between an event stream's looks at its job

    def __post_init__(self) -> None:
        if self.max_queued < 0 or self.max_body_bytes < 1 or self.max_wait < 0:
            raise ValueError("max_queued must be >= 0, max_body_bytes >= 1 and max_wait >= 0")
        if self.event_heartbeat <= 0 or self.event_poll <= 0:
            raise ValueError("event_heartbeat and event_poll must be > 0")
        if self.docs not in ("public", "off", "auto"):
            raise ValueError(f"SD3SERVE_DOCS must be public, off or auto, got {self.docs!r}")
        if self.redis_wait_replicas < 0 or self.redis_wait_timeout_ms < 1:
            raise ValueError("redis_wait_replicas must be >= 0 and redis_wait_timeout_ms >= 1")
        if min(self.requests_per_minute, self.max_jobs_in_flight, self.sweep_interval) < 0 or self.image_url_ttl < 1:
            raise ValueError("requests_per_minute, max_jobs_in_flight and sweep_interval must be >= 0, image_url_ttl >= 1")
        if self.images_timeout <= 0:
            raise ValueError("images_timeout must be > 0")
        _ = self.job_options  # JobOptions checks retries and job_timeout

    @property
    def public_docs(self) -> bool:
        return self.docs == "public" or (self.docs == "auto" and not self.api_keys)

    @cached_property
    def job_options(self) -> JobOptions:
        return JobOptions(self.retries, self.job_timeout, self.result_ttl, self.failure_ttl)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "ApiConfig":
        env = os.environ if env is None else env
        values = env_values(cls, env, skip=("storage", "limits", "webhook"))
        sentinel_url = redis_url_from_env(env)
        if sentinel_url:
            values["redis_url"] = sentinel_url
        values["storage"] = StorageConfig.from_env(env)
        values["webhook"] = WebhookConfig.from_env(env)
        # Defaults (size, steps) follow the served model's sd3serve.json when its folder is here.
        values["limits"] = limits_for_model(limits_from_env(env), env.get("SD3SERVE_MODEL", str(REFERENCE_MODEL_DIR)))
        if not values.get("model_name"):
            values["model_name"] = served_model_name(env.get("SD3SERVE_MODEL", str(REFERENCE_MODEL_DIR)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def served_model(self) -> str:
        return self.model_name or served_model_name(str(REFERENCE_MODEL_DIR))


def served_model_name(model: str) -> str:
    """A model's name for clients: a folder's last part, or the hub id as given."""
    path = model.rstrip("/")
    return path.rsplit("/", 1)[-1] if path.startswith(("/", ".")) else path
