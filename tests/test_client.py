"""The Python client (`worker.client`) and plain RQ against a real Redis: what gets enqueued,
how jobs read back, cancel and wait. No worker runs here (see test_worker_batching.py)."""

from __future__ import annotations

import pytest
from rq import Queue, Retry
from rq.job import Job

from engine.request import RequestLimits, RequestValidationError
from worker import client, keys


def test_submit_validates_and_enqueues_a_complete_request(redis_conn, queue_name):
    job_id = client.submit(redis_conn, {"prompt": "a red circle on a blue background"}, steps=7, queue=queue_name)
    job = Job.fetch(job_id, connection=redis_conn)
    assert job.func_name == keys.JOB_FUNC == "worker.jobs.generate"
    assert job.origin == queue_name
    assert job.retries_left == client.DEFAULT_RETRIES  # a crashed worker's job is re-run, not failed
    assert job.kwargs["steps"] == 7 and job.kwargs["width"] == RequestLimits().default_width
    assert isinstance(job.kwargs["seed"], int)  # drawn now, so it is known before the job runs
    info = client.status(redis_conn, job_id)
    assert info.status == "queued" and info.queue_position == 0
    assert info.seed == job.kwargs["seed"]
    assert info.progress == {"step": 0, "total": 7}
    assert info.result is None and info.error is None and info.started_at is None


def test_invalid_requests_are_refused_before_enqueueing(redis_conn, queue_name):
    with pytest.raises(RequestValidationError) as error:
        client.submit(redis_conn, prompt="a cat", width=100, queue=queue_name)
    assert error.value.field == "width" and "multiple of 16" in error.value.message
    with pytest.raises(RequestValidationError, match="unknown field"):
        client.submit(redis_conn, prompt="a cat", colour="red", queue=queue_name)
    assert Queue(queue_name, connection=redis_conn).count == 0


def test_queue_positions_follow_the_queue(redis_conn, queue_name):
    ids = [client.submit(redis_conn, prompt=f"shape {i}", queue=queue_name) for i in range(3)]
    assert [client.status(redis_conn, i).queue_position for i in ids] == [0, 1, 2]


def test_plain_rq_jobs_read_back_like_client_jobs(redis_conn, queue_name):
    job = Queue(queue_name, connection=redis_conn).enqueue(
        "worker.jobs.generate", prompt="a green square", steps=3, retry=Retry(max=1)
    )
    info = client.status(redis_conn, job.id)
    assert info.status == "queued"
    assert info.request == {"prompt": "a green square", "steps": 3}
    assert info.seed is None  # drawn by the worker when it starts the job
    assert info.progress == {"step": 0, "total": 3}


def test_unknown_and_foreign_jobs_are_not_found(redis_conn, queue_name):
    with pytest.raises(client.JobNotFound):
        client.status(redis_conn, "no-such-job")
    with pytest.raises(client.JobNotFound):
        client.status(redis_conn, "bad id with spaces")
    other = Queue(queue_name, connection=redis_conn).enqueue("os.getcwd")
    with pytest.raises(client.JobNotFound):
        client.status(redis_conn, other.id)


def test_cancel_a_queued_job_and_cancel_again(redis_conn, queue_name):
    job_id = client.submit(redis_conn, prompt="a blue triangle", queue=queue_name)
    assert client.cancel(redis_conn, job_id).status == "canceled"
    assert Queue(queue_name, connection=redis_conn).count == 0
    assert client.cancel(redis_conn, job_id).status == "canceled"  # idempotent
    assert client.wait(redis_conn, job_id, timeout=1).status == "canceled"


def test_wait_times_out_on_a_job_nobody_runs(redis_conn, queue_name):
    job_id = client.submit(redis_conn, prompt="a yellow circle", queue=queue_name)
    with pytest.raises(TimeoutError, match="still queued"):
        client.wait(redis_conn, job_id, timeout=0.3, poll=0.1)
