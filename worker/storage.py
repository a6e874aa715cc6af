"""Where finished images go: S3-compatible object storage (boto3) or a local folder.

Both backends store PNG bytes under a key and hand out a URL for it. S3 URLs are presigned GETs
signed for the *public* endpoint (what a browser can reach), which may differ from the endpoint
the worker talks to (a compose network name, for example). Transient errors (connection refused,
timeouts, 5xx, throttling) are retried with exponential backoff by `store_with_retries`; anything
else, or a transient error that outlasts the retry budget, raises `StorageError`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from engine.settings import env_values

log = logging.getLogger("sd3serve.storage")

BACKENDS = ("local", "s3")
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "ServiceUnavailable",
        "InternalError",
        "503",
        "500",
        "502",
        "504",
    }
)


class StorageError(RuntimeError):
    """Storing or reading an image failed for good. `transient` says whether retrying might help."""

    def __init__(self, message: str, transient: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code  # the S3 error code, when there is one (NoSuchBucket, AccessDenied, ...)

    @property
    def missing_bucket(self) -> bool:
        return self.code == "NoSuchBucket"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries, the first included
    backoff: float = 0.5  # seconds before the second try; doubles each time
    max_backoff: float = 8.0

    def delays(self) -> list[float]:
        return [min(self.backoff * 2**i, self.max_backoff) for i in range(max(self.attempts - 1, 0))]


@dataclass(frozen=True)
class StorageConfig:
    """Filled from SD3SERVE_STORAGE, SD3SERVE_DATA_DIR and SD3SERVE_S3_* variables."""

    backend: str = "local"
    data_dir: str = ".sd3serve"  # local backend: images go to <data_dir>/images
    s3_endpoint_url: str = ""  # empty: AWS's own endpoint
    s3_public_url: str = ""  # endpoint presigned URLs are signed for; empty: s3_endpoint_url
    s3_bucket: str = "sd3serve"
    s3_prefix: str = "images/"
    s3_region: str = "us-east-1"
    s3_access_key: str = ""  # empty: boto3's usual lookup (AWS_* variables, profiles, roles)
    s3_secret_key: str = ""
    s3_url_ttl: int = 3600  # seconds a presigned URL stays valid
    s3_create_bucket: bool = True  # workers create the bucket when it is missing (also while running)
    # Images expire with their jobs: workers put a lifecycle rule deleting objects under s3_prefix
    # this many days old (>= the API's result TTL, rounded up to days); 0: leave the bucket's rules alone.
    s3_expire_days: int = 1
    # An image that cannot be stored is kept on the worker's disk (at most spool_max_bytes in all)
    # and its upload retried until storage_deadline seconds after it was made; then the job fails.
    storage_deadline: float = 900.0
    spool_dir: str = ""  # empty: <data_dir>/spool
    spool_max_bytes: int = 512 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"storage backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("S3 storage needs a bucket (SD3SERVE_S3_BUCKET)")
        if self.retry.attempts < 1 or self.retry.backoff < 0:
            raise ValueError("storage retries must be >= 1 and backoff >= 0")
        if self.storage_deadline < 0 or self.spool_max_bytes < 0:
            raise ValueError("SD3SERVE_STORAGE_DEADLINE and SD3SERVE_SPOOL_MAX_BYTES must be >= 0")

    @property
    def image_dir(self) -> Path:
        return Path(self.data_dir) / "images"

    @property
    def spool_path(self) -> Path:
        return Path(self.spool_dir) if self.spool_dir else Path(self.data_dir) / "spool"

    @property
    def key_prefix(self) -> str:
        """Prefix of image keys: the S3 prefix, or nothing inside the local image folder."""
        return self.s3_prefix if self.backend == "s3" else ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "StorageConfig":
        env = os.environ if env is None else env
        values = env_values(cls, env, skip=("retry",), names={"backend": "SD3SERVE_STORAGE"})
        values["retry"] = RetryPolicy(**env_values(RetryPolicy, env, prefix="SD3SERVE_STORAGE_"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None: ...
    def get(self, key: str) -> bytes: ...
    def url(self, key: str) -> str: ...
    def check(self) -> None: ...
    def ensure_ready(self) -> None: ...
    def delete(self, key: str) -> None: ...


class LocalStorage:
    """Images as files under one folder. URLs are file:// URLs; the API serves the bytes itself."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"invalid image key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers never see half an image
        except OSError as exc:
            raise StorageError(f"could not write {path}: {exc}", transient=True) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"image {key!r} not found") from None
        except OSError as exc:
            raise StorageError(f"could not read {path}: {exc}", transient=True) from exc

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        """Remove an image; a missing one is not an error."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete {key!r}: {exc}", transient=True) from exc

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageError(f"image folder {self.root} is missing or not writable")

    def ensure_ready(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create image folder {self.root}: {exc}") from exc


class S3Storage:
    """Images as objects in an S3-compatible bucket (AWS, MinIO, moto), path-style addressing."""

    def __init__(self, config: StorageConfig) -> None:
        import boto3
        from botocore.config import Config

        self.config = config
        self.bucket = config.s3_bucket
        session = boto3.session.Session(
            aws_access_key_id=config.s3_access_key or None,
            aws_secret_access_key=config.s3_secret_key or None,
            region_name=config.s3_region,
        )
        client_config = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # Our own backoff decides how long to keep trying; botocore adds one quick retry.
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=3,
            read_timeout=10,
        )
        self._client = session.client("s3", endpoint_url=config.s3_endpoint_url or None, config=client_config)
        public = config.s3_public_url or config.s3_endpoint_url or None
        self._signer = session.client("s3", endpoint_url=public, config=client_config)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        self._call(
            "upload", key, lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        )

    def get(self, key: str) -> bytes:
        response = self._call("download", key, lambda: self._client.get_object(Bucket=self.bucket, Key=key))
        return response["Body"].read()

    def url(self, key: str) -> str:
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.config.s3_url_ttl
        )

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def check(self) -> None:
        self._call("reach bucket", self.bucket, lambda: self._client.head_bucket(Bucket=self.bucket))

    def ensure_ready(self) -> None:
        try:
            self.check()
        except StorageError as exc:
            if exc.transient or not self.config.s3_create_bucket:
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.config.s3_region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.s3_region}
            self._call("create bucket", self.bucket, lambda: self._client.create_bucket(**kwargs))
            log.info("created bucket %s", self.bucket)
        if self.config.s3_expire_days:
            from worker.s3_lifecycle import ensure_expiry_rule

            ensure_expiry_rule(self._client, self.bucket, self.config.s3_prefix, self.config.s3_expire_days)

    def _call(self, what: str, key: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            transient = status >= 500 or code in TRANSIENT_S3_CODES
            raise StorageError(
                f"S3 {what} failed for {self.bucket}/{key}: {code or status} {error.get('Message', '')}".rstrip(),
                transient=transient,
                code=code,
            ) from exc
        except BotoCoreError as exc:  # connection refused, timeouts, closed connections
            raise StorageError(f"S3 {what} failed for {self.bucket}/{key}: {exc}", transient=True) from exc


def storage_from_config(config: StorageConfig) -> LocalStorage | S3Storage:
    if config.backend == "s3":
        return S3Storage(config)
    return LocalStorage(config.image_dir)


def store_with_retries(
    storage: Storage,
    key: str,
    data: bytes,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    content_type: str = "image/png",
) -> int:
    """Store `data` under `key`, retrying transient errors with backoff. Returns the tries used.

    Raises `StorageError` (with the number of tries in its message) once the budget is spent.
    """
    delays = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            storage.put(key, data, content_type)
            return attempt
        except StorageError as exc:
            if not exc.transient or attempt == policy.attempts:
                raise StorageError(f"{exc} (gave up after {attempt} tries)", transient=exc.transient) from exc
            delay = delays[attempt - 1]
            log.warning("storing %s failed (try %d of %d): %s; retrying in %.1fs", key, attempt, policy.attempts, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")
