"""One Redis pub/sub subscription per API process, on its queue's job-events channel
(`worker.keys.job_events_channel`), fanned out to the requests waiting on jobs, so a long poll or
an event stream wakes as soon as a worker announces a change (worker/job_events.py).

An announcement is only a hint to re-read the job: waiters still re-read every poll period
(jobs of a stock `rq worker` are never announced, a message can be lost while the subscription
reconnects, e.g. across a Sentinel failover), and when the subscription comes (back) every
waiter is woken once for what it may have missed. A waiter is registered only while its request
runs (`watch` is a context manager), so the table holds the requests in flight, no more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import anyio

from worker import job_events, keys
from worker.redis_conn import connect_async, display_url

log = logging.getLogger("sd3serve.api")

ENDING_POLL = 0.01  # after an ENDING announcement, re-read this often ...
ENDING_WINDOW = 1.0  # ... for this long (RQ records the status a few ms after it)
READ_SECONDS = 1.0  # longest single read of the subscription
PING_EVERY = 5.0  # an idle subscription is pinged this often ...
DEAD_AFTER = 15.0  # ... and given up (reconnected) after this long without a word from Redis
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0


class JobWatch:
    """One waiter's view: woken by announcements of its job of the kinds it asked for."""

    def __init__(self, job_id: str, kinds: frozenset[str]) -> None:
        self.job_id = job_id
        self.kinds = kinds
        self._woken = asyncio.Event()
        self._quick_until = 0.0

    def wake(self, kind: str) -> None:
        if kind == job_events.ENDING:
            self._quick_until = time.monotonic() + ENDING_WINDOW
        self._woken.set()

    async def wait(self, timeout: float) -> None:
        """Until the job is announced or `timeout` seconds pass. An announcement made since the
        last wait counts, so none falls between a re-read and the next wait."""
        if time.monotonic() < self._quick_until:
            timeout = min(timeout, ENDING_POLL)
        if not self._woken.is_set():
            with anyio.move_on_after(timeout):
                await self._woken.wait()
        self._woken.clear()


class JobNotifier:
    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis_url = redis_url
        self.channel = keys.job_events_channel(queue)
        self.subscribed = False  # True while the subscription is confirmed
        self._watches: dict[str, set[JobWatch]] = {}
        self._reconnect_delay = RECONNECT_FIRST
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        """Listen in a task of the running event loop (the app's lifespan), until `aclose`."""
        self._stopping = False
        self._task = asyncio.create_task(self.run())

    async def aclose(self) -> None:
        self._stopping = True  # also ends a listener whose cancellation a read timeout swallowed
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=READ_SECONDS + 1)
            self._task = None

    @contextmanager
    def watch(self, job_id: str, kinds: Iterable[str] = job_events.KINDS) -> Iterator[JobWatch]:
        """Register a waiter on `job_id` for the duration of the block (a request that is
        cancelled, e.g. because its client left, unregisters on the way out)."""
        watch = JobWatch(job_id, frozenset(kinds))
        self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(job_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[job_id]

    @property
    def watching(self) -> int:
        """Waiters registered now."""
        return sum(len(watches) for watches in self._watches.values())

    def dispatch(self, data: bytes | str) -> None:
        event = job_events.parse(data)
        if event is None:
            return
        for watch in list(self._watches.get(event.job_id, ())):
            if event.kind in watch.kinds:
                watch.wake(event.kind)

    def _wake_all(self) -> None:
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.wake(job_events.STATUS)

    async def run(self) -> None:
        """Listen until stopped; after a Redis failure, reconnect with a growing delay."""
        while not self._stopping:
            try:
                await self._listen()
            except Exception as exc:  # Redis down or failing over: waiters re-read on their own meanwhile
                log.warning("job-event subscription on %s lost: %s", display_url(self.redis_url), exc)
            finally:
                self.subscribed = False
            if self._stopping:
                break
            await asyncio.sleep(self._reconnect_delay)
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX)

    async def _listen(self) -> None:
        client = connect_async(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            heard = pinged = time.monotonic()
            while not self._stopping:
                message: Any = await pubsub.get_message(timeout=READ_SECONDS)
                now = time.monotonic()
                if message is None:
                    if now - heard > DEAD_AFTER:
                        raise ConnectionError(f"no word from Redis for {DEAD_AFTER:g} s")
                    if now - max(heard, pinged) >= PING_EVERY:
                        await pubsub.ping()
                        pinged = now
                    continue
                heard = now
                if message["type"] == "message":
                    self.dispatch(message["data"])
                elif message["type"] == "subscribe":  # also after redis-py reconnected on its own
                    self.subscribed = True
                    self._reconnect_delay = RECONNECT_FIRST
                    self._wake_all()
        finally:
            await pubsub.aclose()
            await client.aclose()
