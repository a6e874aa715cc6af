"""Queue and Redis key names shared by the API, the Python client and the workers.

Everything the fleet stores in Redis outside RQ's own keys is named here, so the API and the
workers cannot drift apart.
"""

from __future__ import annotations

import hashlib

DEFAULT_QUEUE = "sd3serve"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
JOB_FUNC = "worker.jobs.generate"  # what jobs are enqueued as, by the API and by plain RQ users

# job.meta fields written by the workers
META_STEP = "step"
META_TOTAL = "total"
META_SEED = "seed"
META_BATCH_SIZE = "batch_size"
META_ERROR = "error"  # {"code": ..., "message": ...} for a failed job
META_STATE = "state"  # a contract.WorkerPhase: running, storing (image computed, upload under way), ...
META_OWNER = "owner"  # owner_id of the API key that created the job; absent: enqueued straight through Redis
META_USER = "user"  # OpenAI's `user` field, as given

KEY_PREFIX = "sd3serve"
# What the API accepts as a job id: RQ's ids (uuid4, with or without dashes) and ids given to
# client.submit. No ':' (RQ reads "<job>:<execution>" as an execution of <job>).
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"


def is_generation(job) -> bool:
    """Whether an RQ job is an sd3serve generation (a job whose payload cannot be read is not)."""
    try:
        return job.func_name == JOB_FUNC
    except Exception:
        return False


def idempotency_key(client_id: str, idempotency_key: str) -> str:
    """Redis key mapping (API key, Idempotency-Key header) to a job id."""
    digest = hashlib.sha256(f"{client_id}\0{idempotency_key}".encode()).hexdigest()
    return f"{KEY_PREFIX}:idempotency:{digest}"


def step_log_key(worker_name: str) -> str:
    """A capped Redis stream where a batching worker records every engine step it ran."""
    return f"{KEY_PREFIX}:worker:{worker_name}:steps"


def job_events_channel(queue: str) -> str:
    """The pub/sub channel on which workers announce that a job of `queue` changed (worker/job_events.py)."""
    return f"{KEY_PREFIX}:queue:{queue}:job-events"


def image_key(prefix: str, job_id: str, index: int = 0, output_format: str = "png") -> str:
    """Object key of image `index` of a job in storage (`<job_id>.png` for the first PNG)."""
    suffix = f"-{index}" if index else ""
    return f"{prefix}{job_id}{suffix}.{output_format}"


def owner_id(api_key: str) -> str:
    """Who owns the jobs an API key creates: a digest of the key (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def owner_jobs_key(owner: str) -> str:
    """A sorted set of the owner's job ids, scored by creation time (GET /v1/jobs)."""
    return f"{KEY_PREFIX}:owner:{owner}:jobs"


def owner_in_flight_key(owner: str) -> str:
    """A sorted set of the owner's jobs that may still be queued or running (the in-flight limit)."""
    return f"{KEY_PREFIX}:owner:{owner}:in-flight"


URL_SIGNING_SECRET = f"{KEY_PREFIX}:url-signing-secret"  # shared by every API replica
