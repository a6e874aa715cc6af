"""Redis connections for the API and the workers: a plain `redis://` URL, or a master found
through Redis Sentinel.

A Sentinel URL names the sentinels and the master's service name:
`redis+sentinel://[:password@]host1:26379,host2:26379,host3:26379/<service>[/<db>]`.
`SD3SERVE_REDIS_SENTINELS=host1:26379,host2:26379` (with `SD3SERVE_REDIS_MASTER`, default
`mymaster`, and `SD3SERVE_REDIS_DB`) builds the same URL. The connection is redis-py's
`Sentinel.master_for`: every new connection asks the sentinels where the master is, so after a
failover the next command (after one `ConnectionError`) goes to the new master.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from redis import Redis

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_MASTER = "mymaster"


@dataclass(frozen=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None
    username: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelAddress:
    """`redis+sentinel://[user:pass@]h1:p1,h2:p2/<service>[/<db>]` → its parts (ValueError if malformed)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {url!r}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h) for h in hosts.split(",") if h.strip())
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2:
        raise ValueError(f"a Sentinel URL looks like {SENTINEL_SCHEME}://host:26379,host2:26379/mymaster/0, got {url!r}")
    db = int(path[1]) if len(path) == 2 else 0
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return SentinelAddress(sentinels, unquote(path[0]), db, unquote(password) or None, unquote(username) or None)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host:
        return text.strip(), DEFAULT_SENTINEL_PORT
    return host.strip("[]"), int(port)


def sentinel_url(sentinels: str, service: str = DEFAULT_MASTER, db: int = 0) -> str:
    """The Sentinel URL for `SD3SERVE_REDIS_SENTINELS`-style 'host:port,host:port' text."""
    hosts = ",".join(part.strip() for part in sentinels.split(",") if part.strip())
    return f"{SENTINEL_SCHEME}://{hosts}/{service}/{db}"


def redis_url_from_env(env: Mapping[str, str]) -> str | None:
    """SD3SERVE_REDIS_SENTINELS (+ _MASTER, _DB) as a Sentinel URL; None when it is not set."""
    sentinels = env.get("SD3SERVE_REDIS_SENTINELS", "").strip()
    service = env.get("SD3SERVE_REDIS_MASTER", DEFAULT_MASTER) or DEFAULT_MASTER
    db = env.get("SD3SERVE_REDIS_DB", "0") or "0"
    if not sentinels:
        return None
    return sentinel_url(sentinels, service, int(db))


def connect(url: str, **options: Any) -> Redis:
    """A Redis client for `url` (redis://, rediss://, unix:// or redis+sentinel://)."""
    from redis.sentinel import Sentinel

    return _client(Redis, Sentinel, url, options)


def connect_async(url: str, **options: Any) -> Any:
    """`connect`, as a redis-py asyncio client (the API's pub/sub listener, api/job_notifier.py)."""
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    return _client(AsyncRedis, AsyncSentinel, url, options)


def _client(redis_class: Any, sentinel_class: Any, url: str, options: dict[str, Any]) -> Any:
    """A client of `redis_class` for a plain URL, or the master `sentinel_class` finds for a
    Sentinel URL (sync and asyncio redis-py share these signatures)."""
    if not is_sentinel_url(url):
        return redis_class.from_url(url, **options)
    address = parse_sentinel_url(url)
    sentinel_options = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = sentinel_class(list(address.sentinels), sentinel_kwargs=sentinel_options or None, **options)
    return sentinel.master_for(address.service, db=address.db, password=address.password, username=address.username)


def display_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()
