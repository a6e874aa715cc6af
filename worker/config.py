"""The batching worker's frozen configuration, from SD3SERVE_* variables and CLI flags."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from engine.config import EngineConfig
from engine.settings import env_values
from worker.keys import DEFAULT_QUEUE, DEFAULT_REDIS_URL
from worker.redis_conn import redis_url_from_env
from worker.storage import StorageConfig
from worker.webhook_config import WebhookConfig


@dataclass(frozen=True)
class WorkerConfig:
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    name: str = ""  # empty: <hostname>.<pid>.<random>
    # A running job's heartbeat lives this long; once it lapses (the worker died), the next
    # maintenance pass of any worker puts the job back in the queue. RQ's defaults add up to
    # ten minutes; these to well under one.
    heartbeat_ttl: int = 30
    heartbeat_every: float = 0.0  # seconds between heartbeats; 0: a quarter of heartbeat_ttl, at most 5
    maintenance_interval: int = 15  # seconds between registry clean-ups (requeue abandoned jobs)
    worker_ttl: int = 60  # the worker's own registration
    progress_every: int = 2  # write job.meta progress every N steps
    shutdown_grace: float = 60.0  # SIGTERM: seconds to finish the running batch before requeueing
    abandoned_retries: int = 2  # given to jobs enqueued without an RQ Retry, so a crash re-runs them
    upload_threads: int = 4
    step_log_len: int = 1000  # steps kept in the worker's step stream; 0: off
    metrics_port: int = 0  # 0: no metrics server
    log_level: str = "INFO"
    engine: EngineConfig = field(default_factory=EngineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)  # SD3SERVE_WEBHOOK_*: deliveries

    def __post_init__(self) -> None:
        if self.heartbeat_ttl < 2:
            raise ValueError("heartbeat_ttl must be at least 2 seconds")
        if not 0 <= self.heartbeat_every < self.heartbeat_ttl:
            raise ValueError("heartbeat_every must be >= 0 and shorter than heartbeat_ttl")
        if self.maintenance_interval < 1 or self.worker_ttl < 2:
            raise ValueError("maintenance_interval must be >= 1 and worker_ttl >= 2 seconds")
        if self.progress_every < 1 or self.upload_threads < 1:
            raise ValueError("progress_every and upload_threads must be >= 1")
        if self.shutdown_grace < 0 or self.abandoned_retries < 0 or self.step_log_len < 0:
            raise ValueError("shutdown_grace, abandoned_retries and step_log_len must be >= 0")

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_every or min(self.heartbeat_ttl / 4, 5.0)

    @property
    def worker_name(self) -> str:
        return self.name or f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "WorkerConfig":
        """`SD3SERVE_<FIELD>` for this class's fields (SD3SERVE_QUEUE, SD3SERVE_HEARTBEAT_TTL, ...),
        plus the engine's and the storage's variables. Overrides that are None are ignored."""
        env = os.environ if env is None else env
        values = env_values(cls, env, skip=("engine", "storage", "webhook"))
        sentinel_url = redis_url_from_env(env)
        if sentinel_url:
            values["redis_url"] = sentinel_url
        engine_overrides = overrides.pop("engine_overrides", None) or {}
        storage_overrides = overrides.pop("storage_overrides", None) or {}
        values["engine"] = EngineConfig.from_env(env, **engine_overrides)
        values["storage"] = StorageConfig.from_env(env, **storage_overrides)
        values["webhook"] = WebhookConfig.from_env(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_engine(self, **changes: Any) -> "WorkerConfig":
        return replace(self, engine=replace(self.engine, **changes))
