"""The typed job contract (worker/contract.py): one status vocabulary, and a result whose stored
JSON is the one older workers wrote, so their jobs still read."""

from __future__ import annotations

import json
import pathlib
import re
from datetime import datetime, timedelta, timezone
from typing import get_args

import pytest
from rq.job import JobStatus

from api.schemas import JobResponse
from engine.request import GenerationRequest
from worker import client, contract
from worker.job_spec import ImageJob
from worker.jobs import StoredImage, build_result

REPO = pathlib.Path(__file__).resolve().parents[1]

# What a worker stored for a succeeded job before the contract existed (worker/jobs.py
# build_result, main at ff71bf1), for n=2 webp images: the stored JSON must not change.
LEGACY_RESULT = {
    "image_key": "jobs/j1.webp",
    "image_url": "file:///srv/jobs/j1.webp",
    "images": [
        {"key": "jobs/j1.webp", "url": "file:///srv/jobs/j1.webp", "seed": 7, "index": 0},
        {"key": "jobs/j1-1.webp", "url": "file:///srv/jobs/j1-1.webp", "seed": 8, "index": 1},
    ],
    "n": 2,
    "output_format": "webp",
    "content_type": "image/webp",
    "seed": 7,
    "width": 64,
    "height": 64,
    "steps": 4,
    "cache_interval": 2,
    "timings": {"queue_seconds": 1.5, "generate_seconds": 0.25, "store_seconds": 0.3, "total_seconds": 3.0},
    "storage_tries": 3,
    "worker": "w1",
}


def test_build_result_stores_the_same_json_as_before():
    spec = ImageJob(
        GenerationRequest(prompt="a red circle", width=64, height=64, steps=4, seed=7, cache_interval=2),
        n=2,
        output_format="webp",
    )
    enqueued = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stored = [
        StoredImage("jobs/j1-1.webp", "file:///srv/jobs/j1-1.webp", tries=2, seconds=0.2, index=1, seed=8),
        StoredImage("jobs/j1.webp", "file:///srv/jobs/j1.webp", tries=1, seconds=0.1, index=0, seed=7),
    ]
    result = build_result(spec, stored, 0.25, enqueued, enqueued + timedelta(seconds=1.5), enqueued + timedelta(seconds=3), "w1")
    assert result == LEGACY_RESULT
    assert list(result) == list(LEGACY_RESULT)  # same key order too: the JSON text is identical
    assert json.dumps(result) == json.dumps(LEGACY_RESULT)


def test_a_result_without_timings_keeps_only_the_known_ones():
    spec = ImageJob(GenerationRequest(prompt="x", seed=3))
    result = build_result(spec, StoredImage("k.png", "u", tries=1, seconds=0.0), 1.0, None, None, datetime.now(timezone.utc), "")
    assert result["timings"] == {"generate_seconds": 1.0, "store_seconds": 0.0}
    assert result["images"] == [{"key": "k.png", "url": "u", "seed": 3, "index": 0}]


def test_job_result_needs_an_image():
    with pytest.raises(ValueError, match="at least one image"):
        contract.JobResult(
            images=(), n=1, output_format="png", content_type="image/png", seed=1, width=64, height=64, steps=1, cache_interval=1
        )


def test_results_of_older_workers_still_read():
    assert contract.result_image_keys(LEGACY_RESULT) == ["jobs/j1.webp", "jobs/j1-1.webp"]
    assert contract.result_image_urls(LEGACY_RESULT) == ["file:///srv/jobs/j1.webp", "file:///srv/jobs/j1-1.webp"]
    single = {"image_key": "old.png", "image_url": "s3://b/old.png", "seed": 1}  # before n images existed
    assert contract.result_image_keys(single) == ["old.png"]
    assert contract.result_image_urls(single) == ["s3://b/old.png"]
    assert contract.result_image_keys(None) == [] and contract.result_image_urls({}) == []


def test_one_status_vocabulary():
    assert contract.JOB_STATES == ("queued", "running", "succeeded", "failed", "canceled")
    assert contract.TERMINAL == {"succeeded", "failed", "canceled"}
    assert client.TERMINAL is contract.TERMINAL
    assert JobResponse.model_fields["status"].annotation is contract.JobState
    assert JobResponse.model_json_schema()["properties"]["status"]["enum"] == list(contract.JOB_STATES)
    every_rq_status = set(JobStatus)
    assert {contract.state_of(s) for s in every_rq_status} <= set(contract.JOB_STATES)
    assert contract.state_of(JobStatus.FINISHED) == "succeeded"
    assert contract.state_of(JobStatus.STOPPED) == "failed"
    assert contract.state_of(JobStatus.SCHEDULED) == "queued"
    assert contract.state_of(None) == "queued"
    assert get_args(contract.WorkerPhase) == ("running", "storing", "stored", "requeued")


def test_no_other_module_defines_the_status_words():
    """The vocabulary lives in worker/contract.py; a second list of the words elsewhere is drift."""
    listing = re.compile(r'"(queued|running|succeeded|failed|canceled)"\s*,\s*"(queued|running|succeeded|failed|canceled)"')
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("api", "worker")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "contract.py" and listing.search(path.read_text())
    ]
    assert offenders == []
