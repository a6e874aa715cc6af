"""Signed, expiring URLs for images in local storage (made by the API and by webhook deliveries):
`/v1/files/<key>?expires=<unix>&signature=<hmac>`.

The signature is an HMAC-SHA256 of the key and the expiry under a secret every API replica
shares (SD3SERVE_URL_SIGNING_KEY, or one drawn once and kept in Redis), so a URL cannot be made
from a job id, and stops working when it expires."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

from redis import Redis

from worker import keys

FILES_PATH = "/v1/files/"


class BadImageUrl(ValueError):
    """An image URL whose signature does not match, or that has expired; `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UrlSigner:
    def __init__(self, redis: Redis, secret: str = "", ttl: int = 3600) -> None:
        self.redis = redis
        self.ttl = ttl
        self._secret = secret.encode() if secret else b""

    def secret(self) -> bytes:
        if not self._secret:  # drawn by the first replica that needs it; the others read it
            self.redis.set(keys.URL_SIGNING_SECRET, secrets.token_hex(32), nx=True)
            stored = self.redis.get(keys.URL_SIGNING_SECRET)
            if not stored:  # never sign with an empty key
                raise RuntimeError("the URL signing secret is missing from Redis")
            self._secret = stored.encode() if isinstance(stored, str) else bytes(stored)
        return self._secret

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode("utf-8", "surrogatepass")  # any path text, never an error
        return hmac.new(self.secret(), message, hashlib.sha256).hexdigest()

    def url(self, base: str, key: str, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + self.ttl
        return f"{base.rstrip('/')}{FILES_PATH}{quote(key)}?expires={expires}&signature={self.signature(key, expires)}"

    def verify(self, key: str, expires: int, signature: str) -> None:
        """Raise BadImageUrl unless `signature` signs `key` until `expires`, and it has not passed."""
        given = signature.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(self.signature(key, expires).encode(), given):
            raise BadImageUrl("bad_signature", "this image URL is not valid; ask the job's status for a fresh one")
        if expires < time.time():
            raise BadImageUrl("url_expired", "this image URL has expired; ask the job's status for a fresh one")
