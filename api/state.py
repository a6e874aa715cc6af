"""What every route of one app shares: its config, Redis, storage, queue and the per-key parts.
The app factory stores one on `app.state.api`; handlers reach it through api/deps.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from api.config import ApiConfig
from worker.admission import CappedQueue


@dataclass
class ApiState:
    config: ApiConfig
    redis: Redis
    storage: Any
    queue: CappedQueue
    urls: Any = None  # worker.signed_urls.UrlSigner
    key_limits: Any = None  # api.key_limits.KeyLimits
    jobs: Any = None  # api.ownership.JobIndex
    notifier: Any = None  # api.job_notifier.JobNotifier, listening while the app runs (its lifespan)
    started: int = field(default_factory=lambda: int(time.time()))  # the served model's `created`

    def __post_init__(self) -> None:
        from api.job_notifier import JobNotifier
        from api.key_limits import KeyLimits
        from api.ownership import JobIndex
        from worker.signed_urls import UrlSigner

        c = self.config
        keep = max(c.result_ttl, c.failure_ttl) + c.job_timeout
        self.urls = self.urls or UrlSigner(self.redis, c.url_signing_key, c.image_url_ttl)
        self.key_limits = self.key_limits or KeyLimits(
            self.redis, c.redis_url, c.requests_per_minute, c.max_jobs_in_flight, c.retry_after, keep
        )
        self.jobs = self.jobs or JobIndex(self.redis, keep)
        self.notifier = self.notifier or JobNotifier(c.redis_url, c.queue)
