"""Sentinel URLs and SD3SERVE_REDIS_SENTINELS (worker/redis_conn.py)."""

from __future__ import annotations

import pytest

from api.config import ApiConfig
from worker.config import WorkerConfig
from worker.redis_conn import connect, display_url, parse_sentinel_url


def test_sentinel_urls_parse():
    address = parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,sentinel-2:26380,[::1]:26381/cache/3")
    assert address.sentinels == (("10.0.0.1", 26379), ("sentinel-2", 26380), ("::1", 26381))
    assert (address.service, address.db, address.password) == ("cache", 3, "pw")
    assert parse_sentinel_url("redis+sentinel://s1/mymaster").sentinels == (("s1", 26379),)
    for bad in ("redis+sentinel://s1:26379", "redis+sentinel:///mymaster", "redis+sentinel://s1/a/1/2"):
        with pytest.raises(ValueError, match="Sentinel URL"):
            parse_sentinel_url(bad)


def test_sentinels_from_the_environment_for_api_and_worker():
    env = {"SD3SERVE_REDIS_SENTINELS": "s1:26379, s2:26379", "SD3SERVE_REDIS_MASTER": "jobs", "SD3SERVE_REDIS_WAIT_REPLICAS": "1"}
    api = ApiConfig.from_env(env)
    assert api.redis_url == "redis+sentinel://s1:26379,s2:26379/jobs/0" and api.redis_wait_replicas == 1
    assert WorkerConfig.from_env(env).redis_url == api.redis_url


def test_a_sentinel_connection_follows_the_master(tmp_path):
    from tests.sentinel_cluster import sentinel_cluster

    with sentinel_cluster(tmp_path) as cluster:
        client = connect(cluster.url, socket_timeout=5)
        client.set("k", "v")
        assert client.connection_pool.get_master_address()[1] == cluster.ports["a"]
        assert display_url("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"


def test_failure_texts_shown_to_clients_carry_no_address():
    from worker.client import scrub

    raw = (
        "redis.exceptions.ConnectionError: Error 111 connecting to 10.1.2.3:6379. Connection refused. "
        'Could not connect to the endpoint URL: "http://minio:9000/bucket/images/x.png"'
    )
    clean = scrub(raw)
    assert "10.1.2.3" not in clean and "6379" not in clean and "minio" not in clean and "http" not in clean
    assert clean.startswith("redis.exceptions.ConnectionError: Error 111 connecting to <internal>")
    assert scrub("width: must be a multiple of 16, got 100") == "width: must be a multiple of 16, got 100"
