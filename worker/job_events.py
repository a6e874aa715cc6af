"""Announcing that a job changed, on its queue's pub/sub channel (`keys.job_events_channel`), so
the API's long polls and event streams wake at once instead of at their next periodic look.

A message is `{"id": <job id>, "event": <kind>}`; it carries no state: a listener re-reads the
job. Messages are a hint only: publishing is fire-and-forget, nobody may rely on one arriving
(a stock `rq worker` with its own job function never publishes), so every listener still
re-reads its job periodically.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

import redis

from worker import keys

log = logging.getLogger("sd3serve.worker")

STATUS = "status"  # the job's status changed: it ended, started, or went back to the queue
# A stock-RQ job's function returned or raised: RQ records its status a moment later, after the
# function (and this message) is done, so listeners re-read it a few times in quick succession.
ENDING = "ending"
KINDS = (STATUS, ENDING)
# Progress (job.meta's step) is not announced: every API process hears every message of its
# queue, 14 more per 28-step job; without them bench/fleet_sim.py at 64 fake H200s did 49.0
# instead of 41.1 jobs/s (p95 20.2 s, not 24.3; one run each, 2-core machine). An event stream
# reads progress on its own period (`event_poll`).


class JobEvent(NamedTuple):
    job_id: str
    kind: str


def message(job_id: str, kind: str) -> str:
    return json.dumps({"id": job_id, "event": kind}, separators=(",", ":"))


def parse(data: bytes | str) -> JobEvent | None:
    """The event in a message's data; None for anything else."""
    try:
        fields = json.loads(data)
        job_id, kind = fields["id"], fields["event"]
    except (ValueError, TypeError, KeyError):
        return None
    return JobEvent(job_id, kind) if isinstance(job_id, str) and kind in KINDS else None


def announce(connection: redis.Redis, job: Any, kind: str) -> None:
    """Publish now, after the change is recorded; a failure is only logged (listeners fall back to
    re-reading the job)."""
    try:
        connection.publish(keys.job_events_channel(job.origin), message(job.id, kind))
    except redis.RedisError as exc:
        log.warning("could not announce %s of job %s: %s", kind, job.id, exc)
