"""One webhook attempt: the status JSON, signed by the Standard Webhooks scheme, POSTed to the
address the URL check resolved (never re-resolved by the HTTP client), redirects not followed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks.webhooks import Webhook

from worker.webhook_urls import WebhookTarget

USER_AGENT = "sd3serve-webhooks/0.1"


@dataclass(frozen=True)
class AttemptOutcome:
    status: int | str  # the HTTP status, or "timeout" / "connection_error"
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """Network errors, timeouts, 5xx (and 408 / 429) are worth another attempt; other answers are final."""
        return not isinstance(self.status, int) or self.status >= 500 or self.status in (408, 429)


def message_id(job_id: str, event: str) -> str:
    """The `webhook-id`: the same for every attempt of one event, so receivers can drop repeats."""
    return f"msg_{job_id}_{event}"


def signed_headers(signer: Webhook, msg_id: str, payload: str, when: datetime | None = None) -> dict[str, str]:
    when = when or datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signer.sign(msg_id, when, payload),
    }


def encode_body(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def post(target: WebhookTarget, payload: str, headers: dict[str, str], timeout: float) -> AttemptOutcome:
    parts = urlsplit(target.url)
    sni = {"sni_hostname": target.host} if target.scheme == "https" else {}
    last_error = "no address"
    for address in target.addresses:
        netloc = f"[{address}]:{target.port}" if ":" in address else f"{address}:{target.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        request_headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": parts.netloc.rsplit("@", 1)[-1],
            **headers,
        }
        try:
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as http:
                response = http.post(pinned, content=payload.encode(), headers=request_headers, extensions=sni)
            return AttemptOutcome(response.status_code, None if response.is_success else response.text[:200])
        except httpx.TimeoutException as exc:
            return AttemptOutcome("timeout", f"no answer within {timeout} s ({type(exc).__name__})")
        except httpx.ConnectError as exc:  # try the host's next address
            last_error = str(exc) or type(exc).__name__
        except httpx.HTTPError as exc:
            return AttemptOutcome("connection_error", str(exc) or type(exc).__name__)
    return AttemptOutcome("connection_error", last_error)
