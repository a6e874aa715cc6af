"""Which webhook URLs sd3serve will call (SSRF protection).

Only http(s) URLs without credentials; when an allow-list is set, only its hosts; and only hosts
whose every address is public: no loopback, link-local (which holds the cloud metadata address
169.254.169.254), private, shared, reserved, multicast or unspecified address, nor an IPv6 form
of one. The API checks at submit time; the deliverer resolves again before every attempt and
connects to the address it checked, so a name re-pointed at an internal address (DNS rebinding)
is refused then too.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from worker.webhook_config import WebhookConfig

MAX_URL_CHARS = 2048
# Metadata services reachable by name (their addresses are link-local, refused anyway).
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal", "metadata.azure.com"}
)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookURLError(ValueError):
    """The webhook URL is not one sd3serve will call; the message says why."""


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    scheme: str
    host: str  # as written in the URL (lower case, no brackets)
    port: int
    addresses: tuple[str, ...]  # the checked addresses, to connect to


def parse_url(url: str, config: WebhookConfig) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL, before any name resolution."""
    if not isinstance(url, str) or not url:
        raise WebhookURLError("must be a non-empty URL")
    if len(url) > MAX_URL_CHARS:
        raise WebhookURLError(f"must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookURLError(f"is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLError(f"must be an http:// or https:// URL, not {parts.scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("must not contain credentials")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise WebhookURLError("has no host")
    if host in METADATA_HOSTS:
        raise WebhookURLError(f"points at a metadata service ({host})")
    if config.allowed_hosts and not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in config.allowed_hosts):
        raise WebhookURLError(f"host {host} is not in the allowed webhook hosts")
    return scheme, host, port or (443 if scheme == "https" else 80)


def refusal(address: IPAddress, allow_loopback: bool) -> str | None:
    """Why this address may not be called, or None if it may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return refusal(embedded, allow_loopback)
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_link_local:
        return "a link-local address (this includes cloud metadata services)"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved or non-public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookURLError(f"host {host} does not resolve ({exc})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, config: WebhookConfig) -> WebhookTarget:
    """The URL's target with its checked addresses; `WebhookURLError` if it may not be called."""
    scheme, host, port = parse_url(url, config)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None and (host == "localhost" or host.endswith(".localhost")):
        addresses = ["127.0.0.1"] if config.allow_loopback else []
        if not addresses:
            raise WebhookURLError(f"host {host} is a loopback address")
    else:
        addresses = [host] if literal is not None else resolve(host, port)
    for text in addresses:
        why = refusal(ipaddress.ip_address(text.split("%", 1)[0]), config.allow_loopback)
        if why is not None:
            raise WebhookURLError(f"host {host} is {why}" + ("" if text == host else f" ({text})"))
    return WebhookTarget(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))
