"""Real jobs through the API and a worker (both started by their images' entrypoints, tiny model
on CPU): the API's and the worker's /metrics move by exactly the amounts the jobs imply."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests import stack_processes as sp
from worker import keys

N_JOBS = 5
STEPS = 4


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"{name}{labels} is not exported"
    return after[key] - before.get(key, 0.0)


def call(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def _steps_run(stack: sp.Stack, expected_request_steps: int, timeout: float = 10) -> list[dict]:
    """The worker's step log (it is flushed to Redis once per loop, so wait for the last step)."""
    connection = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        log = [fields for _, fields in connection.xrange(keys.step_log_key(stack.worker_name))]
        ran = [s for s in log if int(s["batch_size"]) > 0]
        if sum(int(s["batch_size"]) for s in ran) >= expected_request_steps or time.monotonic() > deadline:
            return ran
        time.sleep(0.1)


@pytest.mark.slow
def test_counters_and_histograms_move_by_the_right_amounts(tmp_path: Path, tiny_model_dir: Path) -> None:
    with sp.running_stack(tmp_path, tiny_model_dir) as stack:
        api_metrics = f"{stack.api}/metrics"
        api_before, worker_before = scrape(api_metrics), scrape(stack.worker_metrics)

        jobs = []
        for seed in range(N_JOBS):
            status, job = call(
                stack.api,
                "POST",
                "/v1/jobs",
                {"prompt": f"a red circle {seed}", "seed": seed, "width": 64, "height": 64, "steps": STEPS},
            )
            assert status == 202, job
            jobs.append(job["id"])
        status, _ = call(stack.api, "POST", "/v1/jobs", {"prompt": "bad size", "width": 65})
        assert status == 422

        finished = []
        for job_id in jobs:
            status, job = call(stack.api, "GET", f"/v1/jobs/{job_id}?wait=60")
            assert status == 200 and job["status"] == "succeeded", (job, stack.logs())
            finished.append(job)
        api_after, worker_after = scrape(api_metrics), scrape(stack.worker_metrics)

        # The API: submissions, the rejection and its reason, request timings by route template.
        assert delta(api_before, api_after, "sd3serve_jobs_submitted_total") == N_JOBS
        assert delta(api_before, api_after, "sd3serve_jobs_rejected_total", reason="validation") == 1
        http = "sd3serve_http_request_duration_seconds_count"
        assert delta(api_before, api_after, http, method="POST", route="/v1/jobs", status="202") == N_JOBS
        assert delta(api_before, api_after, http, method="POST", route="/v1/jobs", status="422") == 1
        assert delta(api_before, api_after, http, method="GET", route="/v1/jobs/{job_id}", status="200") == N_JOBS
        assert api_after[("sd3serve_queue_depth", frozenset({("queue", "sd3serve")}))] == 0

        # The worker: one completion, one image and one latency/queue-wait observation per job.
        assert delta(worker_before, worker_after, "sd3serve_jobs_completed_total", status="succeeded") == N_JOBS
        assert delta(worker_before, worker_after, "sd3serve_images_generated_total") == N_JOBS
        for histogram in ("sd3serve_job_latency_seconds", "sd3serve_queue_wait_seconds"):
            assert delta(worker_before, worker_after, f"{histogram}_count") == N_JOBS
            assert delta(worker_before, worker_after, f"{histogram}_bucket", le="+Inf") == N_JOBS

        # ... whose sums agree with the timings the REST status reports for the same jobs.
        latency = sum(_seconds(j["created_at"], j["finished_at"]) for j in finished)
        assert delta(worker_before, worker_after, "sd3serve_job_latency_seconds_sum") == pytest.approx(latency, abs=0.5 * N_JOBS)
        waits = sum(_seconds(j["created_at"], j["started_at"]) for j in finished)
        assert delta(worker_before, worker_after, "sd3serve_queue_wait_seconds_sum") == pytest.approx(waits, abs=0.25 * N_JOBS)

        # Steps: every job spends exactly STEPS steps in the running batch, so the batch-size sum
        # is N*STEPS however the jobs were batched; the step count and times match the worker's
        # own per-step log in Redis.
        ran = _steps_run(stack, expected_request_steps=N_JOBS * STEPS)
        assert delta(worker_before, worker_after, "sd3serve_batch_size_sum") == N_JOBS * STEPS
        assert sum(int(s["batch_size"]) for s in ran) == N_JOBS * STEPS
        assert delta(worker_before, worker_after, "sd3serve_batch_size_count") == len(ran)
        assert delta(worker_before, worker_after, "sd3serve_step_duration_seconds_count") == len(ran)
        assert delta(worker_before, worker_after, "sd3serve_step_duration_seconds_sum") == pytest.approx(
            sum(float(s["step_seconds"]) for s in ran), abs=1e-4 * len(ran) + 1e-3
        )
        # Device seconds (the host clock around each forward, on the CPU): part of every step's time.
        device = delta(worker_before, worker_after, "sd3serve_device_seconds_total")
        assert 0 < device <= sum(float(s["step_seconds"]) for s in ran) + 1e-3
        # ... and the step stream names the size of every step it measured (all 64², as submitted).
        measured = [m.split("=") for s in ran for m in s["device"].split(";") if m]
        assert len(measured) == len(ran) and {size for size, _ in measured} == {"64x64"}
        assert sum(float(seconds) for _, seconds in measured) == pytest.approx(device, abs=1e-4 * len(ran) + 1e-3)
        # cache_interval 1 (the default): every running request computes attention every step.
        assert worker_after[("sd3serve_attention_fresh_ratio", frozenset())] == 1.0
        assert worker_after[("sd3serve_running_requests", frozenset())] == 0
        assert worker_after[("sd3serve_gpu_memory_bytes", frozenset())] == 0  # CPU
