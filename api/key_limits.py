"""Per-key limits on submissions: requests per minute (PyPI `limits`, moving window in Redis) and
jobs in flight (a Redis sorted set per key, admitted by one Lua script). Both live in Redis, so
every API replica counts the same; over a limit the caller gets 429 with Retry-After."""

from __future__ import annotations

import math
import time
from typing import cast

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis
from rq.job import Job, JobStatus
from rq.utils import as_text

from api.errors import ApiError
from worker import keys

_ENDED = {JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value, JobStatus.STOPPED.value}
# Admit `job` if fewer than `limit` are in flight: check and add in one step, so replicas cannot race.
_RESERVE = """
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""


class KeyLimits:
    def __init__(
        self, redis: Redis, redis_url: str, per_minute: int, max_in_flight: int, in_flight_retry_after: int, keep_seconds: int
    ) -> None:
        self.redis = redis
        self.max_in_flight = max_in_flight
        self.in_flight_retry_after = in_flight_retry_after
        self.keep_seconds = keep_seconds
        self.rate = RateLimitItemPerMinute(per_minute) if per_minute else None
        self.limiter = None
        if self.rate is not None:
            storage = RedisStorage(redis_url, key_prefix=f"{keys.KEY_PREFIX}:rate", socket_timeout=10, socket_connect_timeout=5)
            self.limiter = MovingWindowRateLimiter(storage)
        self._reserve = redis.register_script(_RESERVE)

    def count_request(self, caller: str) -> None:
        """One submission of `caller`; 429 once it has made `per_minute` in the last minute."""
        if self.limiter is None or self.rate is None or self.limiter.hit(self.rate, caller):
            return
        reset = self.limiter.get_window_stats(self.rate, caller).reset_time
        retry_after = max(1, math.ceil(reset - time.time()))
        raise ApiError(
            429,
            "rate_limited",
            f"this API key may submit {self.rate.amount} requests per minute; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )

    def reserve(self, caller: str, job_id: str) -> None:
        """Count `job_id` in flight for `caller`; 429 when it already has `max_in_flight`."""
        if not self.max_in_flight:
            return
        key = keys.owner_in_flight_key(caller)
        self._forget_ended(key)
        if not self._reserve(keys=[key], args=[self.max_in_flight, time.time(), job_id, self.keep_seconds]):
            raise ApiError(
                429,
                "too_many_jobs",
                f"this API key has {self.max_in_flight} jobs queued or running; wait for one to finish",
                headers={"Retry-After": str(self.in_flight_retry_after)},
            )

    def release(self, caller: str, job_id: str) -> None:
        if self.max_in_flight:
            self.redis.zrem(keys.owner_in_flight_key(caller), job_id)

    def _forget_ended(self, key: str) -> None:
        ids = [as_text(member) for member in cast("list[bytes]", self.redis.zrange(key, 0, -1))]
        if not ids:
            return
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hget(Job.key_for(job_id), "status")
            states = pipe.execute()
        ended = [job_id for job_id, status in zip(ids, states) if status is None or status.decode() in _ENDED]
        if ended:
            self.redis.zrem(key, *ended)
