"""The Redis side of webhooks: who subscribed, the queue of due deliveries, each attempt's outcome.

A job's subscription lives in its `job.meta["webhook"]` (`{"url", "events"}`), written with the job
itself. An event to deliver is queued once per job and event (an atomic script: a retried or
re-run job is not announced twice) as a member `<job id>|<event>` of its queue's sorted set
(`sd3serve:webhooks:<queue>:due`) scored by when its next attempt is due. A deliverer claims due
members by pushing their score a lease ahead, so a deliverer that dies mid-attempt leaves the
member to come due again: deliveries survive restarts.
Outcomes go to the hash `sd3serve:webhook:<job id>` (`<event>:attempts`, `:last_status`, ...).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from redis import Redis
from redis.typing import EncodableT, FieldT
from rq.utils import as_text

from worker import contract, keys

META_WEBHOOK = "webhook"
RECORD_TTL = 7 * 24 * 3600

_ENQUEUE = """
if redis.call('HSETNX', KEYS[1], ARGV[1] .. ':queued', ARGV[3]) == 1 then
  redis.call('HSET', KEYS[1], 'url', ARGV[4], ARGV[1] .. ':attempts', 0, ARGV[1] .. ':delivered', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 1
end
return 0
"""
_CLAIM = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(items) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return items
"""


def due_key(queue: str) -> str:
    return f"{keys.KEY_PREFIX}:webhooks:{queue}:due"


def record_key(job_id: str) -> str:
    return f"{keys.KEY_PREFIX}:webhook:{job_id}"


def subscription(meta: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    value = (meta or {}).get(META_WEBHOOK)
    return value if isinstance(value, Mapping) and value.get("url") else None


def event_for(status: str) -> str | None:
    """The webhook event a job status announces."""
    if status == contract.RUNNING:
        return "start"
    if status in contract.TERMINAL:
        return "completed"
    return None


def notify(connection: Redis, job: Any, event: str) -> bool:
    """Queue `event` of `job` for delivery if the job subscribed to it (once per job and event).
    Returns whether it was queued now. Cheap (one script call): safe on the worker's hot path."""
    sub = subscription(job.meta)
    if sub is None or event not in sub.get("events", ()):
        return False
    now = time.time()
    return bool(
        connection.eval(
            _ENQUEUE, 2, record_key(job.id), due_key(job.origin), event, f"{job.id}|{event}", now, sub["url"], RECORD_TTL
        )
    )


def claim(connection: Redis, queue: str, limit: int, lease: float) -> list[tuple[str, str]]:
    """Up to `limit` due deliveries as (job id, event), hidden from other deliverers for `lease` s."""
    now = time.time()
    members = connection.eval(_CLAIM, 1, due_key(queue), now, now + lease, limit)
    claimed = []
    for member in members:
        job_id, _, event = (member.decode() if isinstance(member, bytes) else member).rpartition("|")
        claimed.append((job_id, event))
    return claimed


def member(job_id: str, event: str) -> str:
    return f"{job_id}|{event}"


def pending_count(connection: Redis, queue: str) -> int:
    return int(connection.zcard(due_key(queue)))


def read_record(connection: Redis, job_id: str) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in connection.hgetall(record_key(job_id)).items()}


def status_of(connection: Redis, job_id: str) -> dict[str, Any]:
    """`{event, attempts, last_status, delivered, ...}` of the job's latest queued event (completed,
    else start); attempts 0 while nothing has been sent yet."""
    return status_from_record(read_record(connection, job_id))


def status_from_record(record: Mapping[str, str]) -> dict[str, Any]:
    event = next((e for e in ("completed", "start") if f"{e}:queued" in record), None)
    if event is None:
        return {"event": None, "attempts": 0, "last_status": None, "delivered": False, "gave_up": False}
    last = record.get(f"{event}:last_status")
    return {
        "event": event,
        "attempts": int(record.get(f"{event}:attempts", 0)),
        "last_status": int(last) if last and last.isdigit() else last,
        "delivered": record.get(f"{event}:delivered") == "1",
        "gave_up": record.get(f"{event}:gave_up") == "1",
        "last_error": record.get(f"{event}:last_error") or None,
    }


def start_attempt(connection: Redis, job_id: str, event: str) -> int:
    """Count an attempt before making it (a crash mid-attempt still counts); returns its number."""
    key = record_key(job_id)
    with connection.pipeline() as pipe:
        pipe.hincrby(key, f"{event}:attempts", 1)
        pipe.hsetnx(key, f"{event}:first_at", f"{time.time():.3f}")
        attempts, _ = pipe.execute()
    return int(attempts)


def record_outcome(
    connection: Redis,
    queue: str,
    job_id: str,
    event: str,
    status: str | int,
    error: str | None,
    *,
    delivered: bool = False,
    retry_at: float | None = None,
) -> None:
    """Store an attempt's outcome; then either reschedule the delivery or take it off the queue."""
    key = record_key(job_id)
    fields: dict[FieldT, EncodableT] = {
        f"{event}:last_status": str(status),
        f"{event}:last_error": error or "",
        f"{event}:last_at": f"{time.time():.3f}",
    }
    if delivered:
        fields[f"{event}:delivered"] = "1"
    elif retry_at is None:
        fields[f"{event}:gave_up"] = "1"
    with connection.pipeline() as pipe:
        pipe.hset(key, mapping=fields)
        if retry_at is None:
            pipe.zrem(due_key(queue), member(job_id, event))
        else:
            pipe.zadd(due_key(queue), {member(job_id, event): retry_at}, xx=True)
        pipe.execute()


def forget(connection: Redis, queue: str, job_id: str, event: str) -> None:
    connection.zrem(due_key(queue), member(job_id, event))
