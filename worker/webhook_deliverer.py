"""`Deliverer`: drains the webhook queue in a background thread pool, off the step loop.

It claims due deliveries (a lease hides them from other deliverers), makes one attempt each and
records its outcome; a failed attempt is rescheduled with exponential backoff (tenacity's waits)
until `attempts` or `max_seconds` run out. Any number of deliverers may share one Redis: one runs
inside every batching worker, and `sd3serve webhooks` runs one on its own. A deliverer that dies
loses nothing: its claimed deliveries come due again when their lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import redis
from prometheus_client import Counter
from redis import Redis
from standardwebhooks.webhooks import Webhook
from tenacity import RetryCallState, wait_exponential, wait_random

from worker import client, contract, webhook_queue
from worker.client import JobNotFound
from worker.job_view import status_body, to_json
from worker.webhook_config import WebhookConfig
from worker.webhook_delivery import encode_body, message_id, post, signed_headers
from worker.webhook_urls import WebhookURLError, check_url

log = logging.getLogger("sd3serve.webhooks")
ATTEMPTS = Counter(
    "sd3serve_webhook_attempts_total",
    "Webhook delivery attempts by outcome: delivered, retry, gave_up, blocked, job_expired.",
    ["outcome"],
)
BodyFor = Callable[[str], Any]


def status_json(connection: Redis, image_urls_for: Callable[[client.JobInfo], list[str]]) -> BodyFor:
    """The job's status JSON, as `GET /v1/jobs/{id}` shows it."""

    def body_for(job_id: str) -> Any:
        info = client.status(connection, job_id)
        urls = image_urls_for(info) if info.status == contract.SUCCEEDED and info.result else []
        return to_json(status_body(info, urls))

    return body_for


def image_url_function(storage: Any, config: WebhookConfig, connection: Redis) -> Callable[[client.JobInfo], list[str]]:
    """What `GET /v1/jobs/{id}` lists: S3, fresh presigned URLs; local storage, URLs under the
    API's `public_url` signed as the API signs them."""
    from worker.signed_urls import UrlSigner
    from worker.storage import LocalStorage

    signer = UrlSigner(connection, config.url_signing_key, config.image_url_ttl)

    def image_urls(info: client.JobInfo) -> list[str]:
        keys = info.image_keys
        if storage is not None and keys and not isinstance(storage, LocalStorage):
            return [storage.url(key) for key in keys]
        if config.public_url:
            return [signer.url(config.public_url, key) for key in keys]
        return info.image_urls

    return image_urls


class Deliverer:
    def __init__(
        self, connection: Redis, queue: str, config: WebhookConfig, body_for: BodyFor | None = None, poll_interval: float = 0.2
    ) -> None:
        if not config.enabled:
            raise ValueError("webhook delivery needs SD3SERVE_WEBHOOK_SECRET")
        self.connection = connection
        self.queue = queue
        self.config = config
        self.signer = Webhook(config.secret)
        self.body_for = body_for or status_json(connection, image_url_function(None, config, connection))
        self.poll_interval = poll_interval
        self._wait = wait_exponential(multiplier=config.backoff, max=config.max_backoff) + wait_random(0, config.backoff / 4)
        self._pool = ThreadPoolExecutor(max(config.threads, 1), thread_name_prefix="sd3serve-webhook")
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Deliverer":
        self._thread = threading.Thread(target=self.run, name="sd3serve-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; attempts under way finish (bounded by the per-attempt timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("webhook queue unreachable: %s", exc)
                self._stop.wait(1.0)
            except Exception:  # never let the thread die
                log.exception("webhook deliverer poll failed")
                self._stop.wait(1.0)
            self._stop.wait(self.poll_interval)

    def poll(self) -> int:
        """Claim as many due deliveries as there are idle threads and start them. Returns how many."""
        with self._lock:
            free = max(self.config.threads, 1) - self._in_flight
        if free <= 0:
            return 0
        claimed = webhook_queue.claim(self.connection, self.queue, free, self.config.claim_seconds)
        for job_id, event in claimed:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._attempt_safely, job_id, event)
        return len(claimed)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # -- one attempt ----------------------------------------------------------------------------
    def _attempt_safely(self, job_id: str, event: str) -> None:
        try:
            self.attempt(job_id, event)
        except Exception:  # e.g. Redis down: the lease lapses and the delivery comes due again
            log.exception("webhook %s of job %s: attempt failed", event, job_id)
        finally:
            with self._lock:
                self._in_flight -= 1

    def backoff(self, attempt: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(self._wait(state))

    def _give_up(self, job_id: str, event: str, status: str, error: str) -> None:
        ATTEMPTS.labels(outcome=status).inc()
        webhook_queue.record_outcome(self.connection, self.queue, job_id, event, status, error)

    def attempt(self, job_id: str, event: str) -> None:
        record = webhook_queue.read_record(self.connection, job_id)
        if not record or record.get(f"{event}:delivered") == "1" or record.get(f"{event}:gave_up") == "1":
            webhook_queue.forget(self.connection, self.queue, job_id, event)  # done before a crash, or expired
            return
        number = webhook_queue.start_attempt(self.connection, job_id, event)
        first_at = float(record.get(f"{event}:first_at") or time.time())
        try:
            target = check_url(record["url"], self.config)  # resolved again: DNS may have changed
        except WebhookURLError as exc:
            log.warning("webhook %s of job %s refused: %s", event, job_id, exc)
            return self._give_up(job_id, event, "blocked", str(exc))
        try:
            payload = encode_body(self.body_for(job_id))
        except JobNotFound:
            return self._give_up(job_id, event, "job_expired", "the job no longer exists")
        outcome = post(target, payload, signed_headers(self.signer, message_id(job_id, event), payload), self.config.timeout)
        if outcome.delivered:
            log.info("webhook %s of job %s delivered (attempt %d, %s)", event, job_id, number, outcome.status)
            webhook_queue.record_outcome(self.connection, self.queue, job_id, event, outcome.status, None, delivered=True)
            ATTEMPTS.labels(outcome="delivered").inc()
            return
        retry_at = None
        if outcome.retryable and number < self.config.attempts:
            due = time.time() + self.backoff(number)
            if due - first_at <= self.config.max_seconds:
                retry_at = due
        log.warning(
            "webhook %s of job %s: attempt %d got %s%s",
            event,
            job_id,
            number,
            outcome.status,
            "; retrying" if retry_at else "; giving up",
        )
        webhook_queue.record_outcome(self.connection, self.queue, job_id, event, outcome.status, outcome.error, retry_at=retry_at)
        ATTEMPTS.labels(outcome="retry" if retry_at else "gave_up").inc()


def start_for_worker(connection: Redis, queue: str, config: WebhookConfig, storage: Any) -> Deliverer:
    """The deliverer a batching worker runs beside its step loop (its own Redis connection)."""
    own = Redis(connection_pool=redis.ConnectionPool(**connection.connection_pool.connection_kwargs))
    body_for = status_json(own, image_url_function(storage, config, own))
    return Deliverer(own, queue, config, body_for).start()
