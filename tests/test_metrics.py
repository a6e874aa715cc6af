"""api/metrics.py and worker/metrics.py on their own: names, buckets, the scrape-time queue depth,
route-template labels and the worker's metrics HTTP server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

import api.metrics as api_metrics
import worker.metrics as worker_metrics

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_names_follow_prometheus_conventions() -> None:
    for module in (api_metrics, worker_metrics):
        for obj in vars(module).values():
            if isinstance(obj, (Counter, Histogram)) or type(obj).__name__ == "Gauge":
                name = obj._name
                assert name.startswith("sd3serve_"), name
                assert name == name.lower(), name
                if isinstance(obj, Histogram) and name != "sd3serve_batch_size":
                    assert name.endswith("_seconds"), f"{name}: a duration histogram carries its unit"
    assert worker_metrics.GPU_MEMORY._name.endswith("_bytes")
    assert worker_metrics.CACHE_BYTES._name.endswith("_bytes")
    # prometheus_client stores a counter's name without `_total` and exports it with it
    assert api_metrics.JOBS_SUBMITTED._name == "sd3serve_jobs_submitted"
    assert worker_metrics.JOBS_COMPLETED._labelnames == ("status",)
    assert api_metrics.JOBS_REJECTED._labelnames == ("reason",)
    assert api_metrics.REQUEST_LATENCY._labelnames == ("method", "route", "status")


def test_buckets_cover_diffusion_jobs_and_batch_sizes() -> None:
    latency = worker_metrics.JOB_LATENCY._upper_bounds
    assert latency[0] <= 0.5 and latency[-2] >= 300, latency  # 0.5 s tiny jobs .. minutes of backlog
    assert worker_metrics.QUEUE_WAIT._upper_bounds[-2] >= 600
    batch = worker_metrics.BATCH_SIZE._upper_bounds
    assert batch[0] == 1 and batch[-2] == 64 and {2, 4, 8, 16, 32} <= set(batch)
    for bounds in (latency, batch, worker_metrics.STEP_DURATION._upper_bounds):
        assert list(bounds) == sorted(set(bounds))


def test_queue_depth_is_read_at_scrape_time_and_a_failure_skips_it() -> None:
    registry = CollectorRegistry()
    depth = {"value": 3}

    def read() -> int:
        if depth["value"] is None:
            raise ConnectionError("redis down")
        return depth["value"]

    api_metrics.register_queue_depth(read, registry=registry)
    assert _sample(registry, "sd3serve_queue_depth", queue="sd3serve") == 3
    depth["value"] = 11
    assert _sample(registry, "sd3serve_queue_depth", queue="sd3serve") == 11
    depth["value"] = None
    assert _sample(registry, "sd3serve_queue_depth", queue="sd3serve") is None
    body, content_type = api_metrics.render_metrics(registry)
    assert content_type.startswith("text/plain") and b"sd3serve_queue_depth" not in body


def test_a_hung_queue_depth_read_does_not_hold_the_scrape() -> None:
    """Redis (or all its Sentinels) gone silent: the gauge is left out after the timeout, one read
    stays in flight, and the next scrape after it answers has the value again."""
    registry = CollectorRegistry()
    release, calls = threading.Event(), []

    def read() -> int:
        calls.append(1)
        release.wait(10)
        return 4

    registry.register(api_metrics.QueueDepthCollector(read, timeout_s=0.2))
    for _ in range(2):
        start = time.monotonic()
        assert _sample(registry, "sd3serve_queue_depth", queue="sd3serve") is None
        assert time.monotonic() - start < 1.0
    assert len(calls) == 1  # the second scrape waited on the same read, it did not pile up another
    release.set()
    assert _sample(registry, "sd3serve_queue_depth", queue="sd3serve") == 4


def test_registering_the_queue_depth_again_replaces_the_old_callable() -> None:
    registry = CollectorRegistry()
    api_metrics.register_queue_depth(lambda: 1, registry=registry)
    api_metrics.register_queue_depth(lambda: 2, queue="other", registry=registry)
    families = list(text_string_to_metric_families(api_metrics.render_metrics(registry)[0].decode()))
    [family] = [f for f in families if f.name == "sd3serve_queue_depth"]
    assert [(s.labels, s.value) for s in family.samples] == [({"queue": "other"}, 2.0)]


def test_request_latency_is_labelled_by_route_template_not_raw_path() -> None:
    app = FastAPI()
    api_metrics.instrument_app(app)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return {"id": job_id}

    client = TestClient(app)
    route = "/v1/jobs/{job_id}"
    before = _count("GET", route, "200")
    unmatched_before = _count("GET", "unmatched", "404")
    for job_id in ("a1", "b2", "c3"):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.get("/nope").status_code == 404
    assert _count("GET", route, "200") == before + 3
    assert _count("GET", "unmatched", "404") == unmatched_before + 1
    assert _count("GET", "/v1/jobs/a1", "200") == 0


def test_files_under_a_mount_share_one_route_label(tmp_path) -> None:
    from fastapi.staticfiles import StaticFiles

    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "app.js").write_text("1")
    app = FastAPI()
    api_metrics.instrument_app(app)
    app.mount("/", StaticFiles(directory=tmp_path, html=True), name="static")
    client = TestClient(app)
    before_ok, before_missing = _count("GET", "/{path}", "200"), _count("GET", "/{path}", "404")
    assert client.get("/").status_code == 200 and client.get("/app.js").status_code == 200
    assert client.get("/nope.css").status_code == 404
    assert _count("GET", "/{path}", "200") == before_ok + 2
    assert _count("GET", "/{path}", "404") == before_missing + 1


def _count(method: str, route: str, status: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "sd3serve_http_request_duration_seconds_count", {"method": method, "route": route, "status": status}
    )
    return value or 0.0


def test_worker_metrics_server_serves_the_worker_metrics() -> None:
    server = worker_metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        worker_metrics.JOBS_COMPLETED.labels(status="succeeded").inc(2)
        worker_metrics.BATCH_SIZE.observe(5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["sd3serve_jobs_completed"].type == "counter"
    assert any(
        s.name == "sd3serve_jobs_completed_total" and s.labels == {"status": "succeeded"} and s.value >= 2
        for s in families["sd3serve_jobs_completed"].samples
    )
    bucket_8 = [
        s.value
        for s in families["sd3serve_batch_size"].samples
        if s.name == "sd3serve_batch_size_bucket" and s.labels["le"] == "8.0"
    ]
    assert bucket_8 and bucket_8[0] >= 1
    for name in (
        "sd3serve_running_requests",
        "sd3serve_attention_fresh_ratio",
        "sd3serve_attention_cache_bytes",
        "sd3serve_attention_cache_allocated_bytes",
        "sd3serve_gpu_memory_bytes",
        "sd3serve_step_duration_seconds",
        "sd3serve_device_seconds",
        "sd3serve_queue_wait_seconds",
        "sd3serve_job_latency_seconds",
        "sd3serve_images_generated",
    ):
        assert name in families, name


def test_metric_modules_do_not_import_torch() -> None:
    code = "import sys, api.metrics, worker.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
