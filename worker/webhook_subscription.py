"""A job's webhook subscription as submitted (`webhook`, `webhook_events_filter`), checked the same
way by the API and the Python client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.request import RequestValidationError
from worker.webhook_config import DEFAULT_EVENTS, EVENTS, WebhookConfig
from worker.webhook_urls import WebhookURLError, check_url


@dataclass(frozen=True)
class Subscription:
    url: str
    events: tuple[str, ...]

    def to_meta(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}


def subscribe(url: Any, events_filter: Any = None, config: WebhookConfig | None = None) -> Subscription:
    """Check a webhook URL (scheme, allow-list, public addresses) and its event filter.
    Raises `RequestValidationError` naming `webhook` or `webhook_events_filter`."""
    config = config or WebhookConfig.from_env()
    if url is None:
        raise RequestValidationError("webhook", "a webhook_events_filter needs a webhook URL")
    if not config.enabled:
        raise RequestValidationError("webhook", "webhooks are not enabled on this server (SD3SERVE_WEBHOOK_SECRET)")
    if not isinstance(url, str):
        raise RequestValidationError("webhook", "must be a URL string")
    try:
        check_url(url, config)
    except WebhookURLError as exc:
        raise RequestValidationError("webhook", str(exc)) from None
    return Subscription(url=url, events=parse_events(events_filter))


def parse_events(events_filter: Any) -> tuple[str, ...]:
    if events_filter is None:
        return DEFAULT_EVENTS
    if isinstance(events_filter, str) or not isinstance(events_filter, (list, tuple)):
        raise RequestValidationError("webhook_events_filter", f"must be a list of events from {list(EVENTS)}")
    if not events_filter:
        raise RequestValidationError("webhook_events_filter", "must name at least one event")
    for event in events_filter:
        if event not in EVENTS:
            raise RequestValidationError("webhook_events_filter", f"unknown event {event!r}; choose from {list(EVENTS)}")
    return tuple(e for e in EVENTS if e in events_filter)
