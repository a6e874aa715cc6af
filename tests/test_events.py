"""`GET /v1/jobs/{id}/events` over real HTTP (uvicorn on 127.0.0.1) with a real batching worker."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from api.app import create_app
from tests.fleet_fixtures import ApiServer, api_config, make_thread_worker
from tests.stack_processes import wait_until
from worker.storage import StorageConfig

PROMPT = "a red circle on a blue background"


def read_events(response: httpx.Response, comments: list[str] | None = None):
    """Parse an SSE stream into (event, data) pairs; comment lines go to `comments`."""
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


@pytest.fixture
def api_server(fleet_redis, queue_name, tmp_path):
    config = api_config(
        fleet_redis.url, queue_name, storage=StorageConfig(data_dir=str(tmp_path)), event_heartbeat=0.3, event_poll=0.02
    )
    with ApiServer(create_app(config)) as server:
        yield server


def test_a_real_job_streams_increasing_steps_and_ends_with_succeeded(api_server, fleet_redis, queue_name, tiny_engine, tmp_path):
    with httpx.Client(base_url=api_server.url, timeout=30) as http:
        job_id = http.post("/v1/jobs", json={"prompt": PROMPT, "steps": 80, "seed": 3}).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = []
            worker = None
            for event in read_events(response):
                events.append(event)
                if worker is None:  # the first event arrives while queued; only now may the job run
                    assert event[0] == "queued" and event[1]["queue_position"] == 0
                    worker = make_thread_worker(
                        tiny_engine, fleet_redis.url, queue_name, StorageConfig(data_dir=str(tmp_path)), progress_every=1
                    ).__enter__()
        worker.stop()
        final = http.get(f"/v1/jobs/{job_id}").json()
    steps = [data["step"] for name, data in events if name == "running"]
    assert len(steps) >= 3, events
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # strictly increasing
    assert all(data["total"] == 80 for name, data in events if name == "running")
    name, data = events[-1]
    # the same status JSON; image URLs are signed afresh per answer, so their expiry may differ
    assert name == "succeeded" and unsigned(data) == unsigned(final) and data["images"]


def test_a_canceled_job_s_stream_ends_with_canceled(api_server):
    events: list = []
    with httpx.Client(base_url=api_server.url, timeout=30) as http:
        job_id = http.post("/v1/jobs", json={"prompt": PROMPT}).json()["id"]  # no worker: it stays queued

        def listen() -> None:
            with httpx.stream("GET", f"{api_server.url}/v1/jobs/{job_id}/events", timeout=30) as response:
                events.extend(read_events(response))

        listener = threading.Thread(target=listen)
        listener.start()
        wait_until(lambda: events, 10, what="the queued event")
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        listener.join(15)
        assert not listener.is_alive(), "the stream did not end"
    assert [name for name, _ in events] == ["queued", "canceled"]
    assert events[-1][1]["status"] == "canceled"


def test_heartbeat_comments_and_a_clean_close_when_the_client_goes_away(api_server):
    def streams_open() -> float:
        text = httpx.get(f"{api_server.url}/metrics").text
        line = next(row for row in text.splitlines() if row.startswith("sd3serve_event_streams_open"))
        return float(line.split()[-1])

    with httpx.Client(base_url=api_server.url, timeout=30) as http:
        job_id = http.post("/v1/jobs", json={"prompt": PROMPT}).json()["id"]
        comments: list[str] = []
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            deadline = time.monotonic() + 10
            lines, open_while_reading = [], []
            for line in response.iter_lines():  # an idle queued job: one event, then only heartbeats
                lines.append(line)
                if line.startswith(":"):
                    comments.append(line)
                    open_while_reading.append(streams_open())
                if len(comments) >= 2 or time.monotonic() > deadline:
                    break  # httpx closes the connection here
            assert lines[0] == "event: queued", lines
            assert open_while_reading == [1, 1]
        # The client went away: the server's stream ends (and its poll loop with it).
        wait_until(lambda: streams_open() == 0, 10, interval=0.1, what="the stream to close")
    assert len(comments) >= 2 and all(c.startswith(": ping") for c in comments), comments


def test_events_of_an_unknown_job_are_404(api_server):
    response = httpx.get(f"{api_server.url}/v1/jobs/nope/events", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def unsigned(body: dict) -> dict:
    """`body` with the query (expiry, signature) of its image URLs left out."""
    strip = lambda url: url.split("?", 1)[0] if url else url  # noqa: E731
    return {**body, "image_url": strip(body.get("image_url")), "images": [strip(u) for u in body.get("images", [])]}
