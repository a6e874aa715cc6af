"""Webhook settings, one frozen config shared by the API (submit-time checks), the client and the
deliverers, from SD3SERVE_WEBHOOK_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from engine.settings import env_values

EVENTS = ("start", "completed")  # `completed` covers succeeded, failed and canceled
DEFAULT_EVENTS = ("completed",)


@dataclass(frozen=True)
class WebhookConfig:
    secret: str = ""  # Standard Webhooks secret ("whsec_<base64>"); empty: webhooks are off
    allowed_hosts: tuple[str, ...] = ()  # host names ("hooks.example.com", "*.example.com"); empty: any public host
    allow_loopback: bool = False  # tests and single-machine setups: also 127.0.0.0/8 and ::1
    attempts: int = 6  # deliveries of one event at most
    timeout: float = 5.0  # seconds per attempt (connect + response)
    backoff: float = 1.0  # seconds before the second attempt, doubling after each failure
    max_backoff: float = 60.0
    max_seconds: float = 600.0  # no attempt starts later than this after the first
    threads: int = 8  # concurrent deliveries per deliverer; 0: the worker starts no deliverer
    lease: float = 0.0  # seconds a claimed delivery is hidden from other deliverers; 0: timeout + 10
    public_url: str = ""  # SD3SERVE_PUBLIC_URL: the API's base, for image URLs of local storage
    # Local-storage image URLs are signed as the API signs them (worker/signed_urls.py)
    url_signing_key: str = ""  # SD3SERVE_URL_SIGNING_KEY; empty: the secret the API keeps in Redis
    image_url_ttl: int = 3600  # SD3SERVE_IMAGE_URL_TTL

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout <= 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError("webhook attempts must be >= 1, timeout > 0 and 0 <= backoff <= max_backoff")
        if self.max_seconds < 0 or self.threads < 0 or self.lease < 0:
            raise ValueError("webhook max_seconds, threads and lease must be >= 0")
        if self.secret:
            from standardwebhooks.webhooks import Webhook

            try:
                Webhook(self.secret)
            except Exception as exc:
                raise ValueError(
                    f"SD3SERVE_WEBHOOK_SECRET is not a Standard Webhooks secret ('whsec_' + base64): {exc}"
                ) from None

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    @property
    def claim_seconds(self) -> float:
        return self.lease or self.timeout + 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "WebhookConfig":
        env = os.environ if env is None else env
        values = env_values(
            cls,
            env,
            prefix="SD3SERVE_WEBHOOK_",
            names={
                "public_url": "SD3SERVE_PUBLIC_URL",
                "url_signing_key": "SD3SERVE_URL_SIGNING_KEY",
                "image_url_ttl": "SD3SERVE_IMAGE_URL_TTL",
            },
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
