"""Jobs belong to the API key that created them: who may see a job, and each owner's job list.

The list is a Redis sorted set per owner (job ids scored by creation time), so every API replica
sees the same list; ids of jobs whose records have expired are dropped as the list is read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

from redis import Redis
from rq.job import Job
from rq.utils import as_text

from worker import keys
from worker.client import JobInfo


def visible_to(info: JobInfo, caller: str) -> bool:
    """An owned job is its owner's alone; one enqueued straight through Redis (no owner) is everyone's."""
    return info.owner is None or info.owner == caller


@dataclass(frozen=True)
class JobPage:
    job_ids: list[str]
    next_cursor: str | None


class JobIndex:
    def __init__(self, redis: Redis, keep_seconds: int) -> None:
        self.redis = redis
        self.keep_seconds = keep_seconds  # how long an owner's list outlives its newest job

    def add(self, owner: str, job_id: str, created: float | None = None) -> None:
        key = keys.owner_jobs_key(owner)
        with self.redis.pipeline() as pipe:
            pipe.zadd(key, {job_id: created if created is not None else time.time()})
            pipe.zremrangebyscore(key, "-inf", time.time() - self.keep_seconds)
            pipe.expire(key, self.keep_seconds)
            pipe.execute()

    def remove(self, owner: str, job_id: str) -> None:
        self.redis.zrem(keys.owner_jobs_key(owner), job_id)

    def page(self, owner: str, limit: int, cursor: str | None = None) -> JobPage:
        """Up to `limit` of the owner's existing jobs, newest first, older than `cursor` (a score)."""
        key = keys.owner_jobs_key(owner)
        upper = f"({cursor}" if cursor else "+inf"
        found: list[str] = []
        while len(found) < limit:
            batch = self.redis.zrevrangebyscore(key, upper, "-inf", start=0, num=limit - len(found), withscores=True)
            if not batch:
                return JobPage(found, None)
            ids = [as_text(member) for member, _ in cast("list[tuple[bytes, float]]", batch)]
            with self.redis.pipeline() as pipe:
                for job_id in ids:
                    pipe.exists(Job.key_for(job_id))
                alive = pipe.execute()
            gone = [job_id for job_id, exists in zip(ids, alive) if not exists]
            if gone:
                self.redis.zrem(key, *gone)
            found += [job_id for job_id, exists in zip(ids, alive) if exists]
            upper = f"({batch[-1][1]!r}"
        more = self.redis.zrevrangebyscore(key, upper, "-inf", start=0, num=1)
        return JobPage(found, upper[1:] if more else None)
