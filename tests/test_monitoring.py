"""monitoring/: every metric the dashboard and the alerts query is exported by the code, and
Prometheus' own tool accepts the config, the rules and the rules' unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import api.metrics as api_metrics
import worker.metrics as worker_metrics  # noqa: F401  (registers the worker's metrics)
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "sd3serve.json"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed: `apt-get install -y prometheus` in make test's setup (Debian package)"

METRIC_NAME = re.compile(r"\b(sd3serve_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')


def exported_series() -> dict[str, set[str]]:
    """Every series name the code can export, with the label names each carries."""
    families = [f for f in REGISTRY.collect() if f.name.startswith("sd3serve_")]
    families += list(api_metrics.QueueDepthCollector(lambda: 0).collect())
    names: dict[str, set[str]] = {}
    for family in families:
        labels = set(_label_names(family.name))
        if family.type == "counter":
            names[family.name + "_total"] = labels
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            names[family.name] = labels
    return names


def _label_names(family_name: str) -> tuple[str, ...]:
    if family_name == api_metrics.QUEUE_DEPTH_NAME:
        return ("queue",)
    for collector, names in REGISTRY._collector_to_names.items():  # labels are declared on the collector
        if any(n.startswith(family_name) for n in names):
            return tuple(getattr(collector, "_labelnames", ()))
    raise AssertionError(f"no collector for {family_name}")


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def scrape_jobs() -> set[str]:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_is_exported_with_its_labels(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    exported = exported_series()
    queried = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert queried, f"no sd3serve_* metric found in the {source}"
    missing = queried - exported.keys()
    assert not missing, f"{source} queries metrics the code does not export: {sorted(missing)}"
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            for label, value in MATCHER.findall(matchers):
                if name == "up":
                    assert label != "job" or value in scrape_jobs(), f"{expr!r}: no scrape job {value!r}"
                elif name.startswith("sd3serve_"):
                    assert label in exported[name], f"{expr!r}: {name} has no label {label!r}"


def test_dashboard_shows_what_the_design_asks_for() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "sd3serve_images_generated_total",  # images/min
        "histogram_quantile(0.5, sum by (le) (rate(sd3serve_job_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(sd3serve_job_latency_seconds_bucket",
        "sd3serve_queue_depth",
        "sd3serve_batch_size",
        'up{job="sd3serve-worker"}',
        "sd3serve_attention_fresh_ratio",
        "sd3serve_gpu_memory_bytes",
        "rate(sd3serve_device_seconds_total",  # how busy each worker keeps its device
    ):
        assert needle in exprs


def test_dashboard_uses_the_provisioned_datasource_and_is_regenerated() -> None:
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    board = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in board["panels"]} | {
        t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]
    }
    assert used == {uid}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    sys.path.insert(0, str(MONITORING / "grafana"))
    try:
        import dashboard  # the generator script
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == dashboard.render(), "run `python monitoring/grafana/dashboard.py` and commit"


def test_alerts_cover_backlog_dead_workers_failures_latency_and_a_starved_gpu() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {
        "SD3ServeBacklogGrowing",
        "SD3ServeNoWorkerAlive",
        "SD3ServeHighFailureRate",
        "SD3ServeLatencyP95High",
        "SD3ServeWorkerStarvesGPU",
    } <= names


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_alert_rules_fire_when_they_should_and_only_then() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum(rate(sd3serve_images_generated_total[5m])\n")
    assert _promtool("check", "rules", str(bad)).returncode != 0
