"""Writes the sd3serve Grafana dashboard (dashboards/sd3serve.json).

The JSON is committed; edit the panels here and run `python monitoring/grafana/dashboard.py`
(a test checks the committed file matches this script's output).
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "sd3serve-prometheus"}
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "sd3serve.json"
RATE = "$__rate_interval"


def _target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(
    pid: int,
    title: str,
    kind: str,
    grid: tuple[int, int, int, int],
    targets: list[tuple[str, str]],
    unit: str = "short",
    description: str = "",
    **options,
) -> dict:
    x, y, w, h = grid
    panel = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})}, "overrides": []},
        "options": options or {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }
    return panel


def _quantile(q: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket[{RATE}])))"


def panels() -> list[dict]:
    stat_opts = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "auto",
    }
    return [
        _panel(
            1,
            "Images / min",
            "stat",
            (0, 0, 6, 5),
            [(f"sum(rate(sd3serve_images_generated_total[{RATE}])) * 60", "images/min")],
            description="Images generated and stored by all workers.",
            **stat_opts,
        ),
        _panel(
            2,
            "Queue depth",
            "stat",
            (6, 0, 6, 5),
            [("sum(sd3serve_queue_depth)", "waiting")],
            description="Jobs waiting in Redis for a worker.",
            **stat_opts,
        ),
        _panel(
            3,
            "Workers up",
            "stat",
            (12, 0, 6, 5),
            [('sum(up{job="sd3serve-worker"})', "workers")],
            description="Worker processes answering their metrics scrape.",
            **stat_opts,
        ),
        _panel(
            4,
            "Attention FRESH ratio",
            "stat",
            (18, 0, 6, 5),
            [("avg(sd3serve_attention_fresh_ratio)", "fresh")],
            unit="percentunit",
            description="Share of running requests that computed attention in the last step (1 = no caching).",
            **stat_opts,
        ),
        _panel(
            5,
            "Throughput",
            "timeseries",
            (0, 5, 12, 8),
            [
                (f"sum(rate(sd3serve_images_generated_total[{RATE}])) * 60", "images/min"),
                (f"sum(rate(sd3serve_jobs_submitted_total[{RATE}])) * 60", "submitted/min"),
                (f"sum by (status) (rate(sd3serve_jobs_completed_total[{RATE}])) * 60", "{{status}}/min"),
                (f"sum by (reason) (rate(sd3serve_jobs_rejected_total[{RATE}])) * 60", "rejected {{reason}}/min"),
            ],
            unit="short",
        ),
        _panel(
            6,
            "Job latency (submit to stored image)",
            "timeseries",
            (12, 5, 12, 8),
            [
                (_quantile(0.5, "sd3serve_job_latency_seconds"), "p50"),
                (_quantile(0.95, "sd3serve_job_latency_seconds"), "p95"),
                (_quantile(0.95, "sd3serve_queue_wait_seconds"), "queue wait p95"),
            ],
            unit="s",
        ),
        _panel(7, "Queue depth", "timeseries", (0, 13, 12, 8), [("sum by (queue) (sd3serve_queue_depth)", "{{queue}}")]),
        _panel(
            8,
            "Batch size",
            "timeseries",
            (12, 13, 12, 8),
            [
                (f"sum(rate(sd3serve_batch_size_sum[{RATE}])) / sum(rate(sd3serve_batch_size_count[{RATE}]))", "mean"),
                (_quantile(0.95, "sd3serve_batch_size"), "p95"),
                ("sum by (instance) (sd3serve_running_requests)", "running {{instance}}"),
            ],
        ),
        _panel(
            9,
            "Step time",
            "timeseries",
            (0, 21, 12, 8),
            [
                (_quantile(0.5, "sd3serve_step_duration_seconds"), "p50"),
                (_quantile(0.95, "sd3serve_step_duration_seconds"), "p95"),
            ],
            unit="s",
        ),
        _panel(
            10,
            "Attention FRESH ratio per worker",
            "timeseries",
            (12, 21, 12, 8),
            [("sd3serve_attention_fresh_ratio", "{{instance}}")],
            unit="percentunit",
            defaults={"min": 0, "max": 1},
        ),
        _panel(
            11,
            "GPU memory",
            "timeseries",
            (0, 29, 12, 8),
            [
                ("sd3serve_gpu_memory_bytes", "allocated {{instance}}"),
                ("sd3serve_attention_cache_bytes", "attention cache {{instance}}"),
                ("sd3serve_attention_cache_allocated_bytes", "attention cache pools {{instance}}"),
            ],
            unit="bytes",
        ),
        _panel(
            12,
            "API latency p95 by route",
            "timeseries",
            (12, 29, 12, 8),
            [(_quantile(0.95, "sd3serve_http_request_duration_seconds", "le, route"), "{{route}}")],
            unit="s",
        ),
        _panel(
            13,
            "Device busy with steps, per worker",
            "timeseries",
            (0, 37, 12, 8),
            [(f"rate(sd3serve_device_seconds_total[{RATE}])", "{{instance}}")],
            unit="percentunit",
            description="Device seconds of engine steps per second. Low while jobs wait: the worker starves its GPU.",
            defaults={"min": 0, "max": 1},
        ),
    ]


def dashboard() -> dict:
    return {
        "uid": "sd3serve-overview",
        "title": "sd3serve",
        "description": "Throughput, latency, queue and batching of the sd3serve fleet.",
        "tags": ["sd3serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
