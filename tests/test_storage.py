"""Image storage against a real S3 server on loopback (moto server mode) and a local folder."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.fleet_fixtures import s3_storage_config
from worker.storage import (
    LocalStorage,
    RetryPolicy,
    S3Storage,
    StorageConfig,
    StorageError,
    storage_from_config,
    store_with_retries,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


def test_local_storage_round_trip(tmp_path):
    storage = storage_from_config(StorageConfig(data_dir=str(tmp_path)))
    assert isinstance(storage, LocalStorage)
    with pytest.raises(StorageError):
        storage.check()  # folder not created yet
    storage.ensure_ready()
    storage.check()
    storage.put("job1.png", PNG)
    assert storage.get("job1.png") == PNG
    assert storage.url("job1.png") == (tmp_path / "images" / "job1.png").as_uri()
    assert not list((tmp_path / "images").glob("*.part"))
    with pytest.raises(StorageError, match="invalid image key"):
        storage.put("../escape.png", PNG)
    with pytest.raises(StorageError, match="not found"):
        storage.get("missing.png")


def test_s3_put_and_presigned_get_through_public_endpoint(moto_s3):
    config = s3_storage_config(moto_s3)
    storage = S3Storage(config)
    with pytest.raises(StorageError) as missing:
        storage.check()
    assert not missing.value.transient  # no such bucket: retrying would not help
    storage.ensure_ready()  # creates the bucket
    storage.check()
    storage.put(f"{config.s3_prefix}a.png", PNG)
    assert storage.get(f"{config.s3_prefix}a.png") == PNG
    url = storage.url(f"{config.s3_prefix}a.png")
    assert url.startswith(moto_s3.endpoint + f"/{config.s3_bucket}/images/a.png?")  # path style
    assert "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == PNG


def test_presigned_urls_are_signed_for_the_public_endpoint(moto_s3):
    config = s3_storage_config(moto_s3)
    public = StorageConfig(**{**config.__dict__, "s3_public_url": "https://images.example.com"})
    url = S3Storage(public).url("images/a.png")
    assert url.startswith(f"https://images.example.com/{config.s3_bucket}/images/a.png?")


def test_s3_outage_is_retried_until_the_server_is_back(moto_s3):
    config = s3_storage_config(moto_s3)
    storage = S3Storage(config)
    storage.ensure_ready()
    moto_s3.stop()
    restarter = threading.Timer(1.5, moto_s3.start)
    restarter.start()
    try:
        start = time.monotonic()
        tries = store_with_retries(storage, "images/late.png", PNG, RetryPolicy(attempts=10, backoff=0.2, max_backoff=0.5))
    finally:
        restarter.join()
    assert tries > 1
    assert time.monotonic() - start >= 1.0
    assert storage.get("images/late.png") == PNG


def test_s3_outage_past_the_budget_fails_with_a_clear_error(moto_s3):
    storage = S3Storage(s3_storage_config(moto_s3))
    storage.ensure_ready()
    moto_s3.stop()
    try:
        with pytest.raises(StorageError, match=r"gave up after 3 tries") as failure:
            store_with_retries(storage, "images/lost.png", PNG, RetryPolicy(attempts=3, backoff=0.05))
    finally:
        moto_s3.start()
    assert failure.value.transient
    assert "connect" in str(failure.value).lower()


def test_permanent_errors_are_not_retried(moto_s3):
    storage = S3Storage(s3_storage_config(moto_s3, bucket="never-created-bucket"))
    sleeps: list[float] = []
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store_with_retries(storage, "k.png", PNG, RetryPolicy(attempts=5, backoff=1), sleep=sleeps.append)
    assert sleeps == []


def test_storage_config_from_env():
    config = StorageConfig.from_env(
        {
            "SD3SERVE_STORAGE": "s3",
            "SD3SERVE_S3_ENDPOINT_URL": "http://minio:9000",
            "SD3SERVE_S3_PUBLIC_URL": "http://localhost:9000",
            "SD3SERVE_S3_BUCKET": "imgs",
            "SD3SERVE_S3_PREFIX": "out/",
            "SD3SERVE_STORAGE_ATTEMPTS": "3",
            "SD3SERVE_S3_CREATE_BUCKET": "0",
        }
    )
    assert (config.backend, config.s3_bucket, config.key_prefix) == ("s3", "imgs", "out/")
    assert config.retry.attempts == 3 and not config.s3_create_bucket
    with pytest.raises(ValueError, match="storage backend"):
        StorageConfig.from_env({"SD3SERVE_STORAGE": "ftp"})
    with pytest.raises(ValueError, match="SD3SERVE_STORAGE_ATTEMPTS"):
        StorageConfig.from_env({"SD3SERVE_STORAGE_ATTEMPTS": "many"})
