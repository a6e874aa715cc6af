"""Finished images survive storage outages: upload, and if storage is down, keep the PNG on the
worker's disk and retry in the background until a deadline.

`store_durably` is what every worker runs for a finished image. A transient failure (storage
unreachable, 5xx, throttling) moves the PNG into the spool folder (bounded in bytes for the whole
worker) and the upload is retried with backoff until `storage_deadline` seconds after the image
was made; meanwhile the job stays `running` with `meta.state == "storing"`. A missing bucket is
created again (when `SD3SERVE_S3_CREATE_BUCKET` allows) without a restart. Past the deadline, or
when the spool is full, the job fails with `retry=True`, i.e. through RQ's retry path.

Uploads are idempotent: the object key is `<prefix><job id>.png`, so a re-run of a job whose
worker died while storing (or a retry after a lost acknowledgement) overwrites the same object
with the same image (same request, same seed) instead of adding a second one.

Errors raised here carry a public message (no hosts, ports or bucket names); the details go to
the worker's log.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from worker import keys
from worker.jobs import StoredImage, encode_image
from worker.job_spec import CONTENT_TYPES, ImageJob
from worker.spool import Spool
from worker.storage import Storage, StorageConfig, StorageError

log = logging.getLogger("sd3serve.storage")


class StoreFailed(RuntimeError):
    """An image could not be stored. `code`/`message` are safe to show clients; `retry` says whether
    RQ should re-run the job."""

    def __init__(self, code: str, message: str, retry: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry = retry


@dataclass
class _Held:
    """An image waiting on the worker's disk for storage to come back."""

    key: str
    path: Path
    size: int
    deadline: float
    started: float
    future: "Future[StoredImage]"
    delays: Iterator[float]
    tries: int
    next_try: float = 0.0
    index: int = 0
    seed: int | None = None


class DurableUploader:
    """Stores finished images: a first try in a thread pool; images that storage refuses for now go
    to the spool and one retry thread tries them again with backoff until their deadline."""

    def __init__(self, storage: Storage, config: StorageConfig, threads: int) -> None:
        self.storage = storage
        self.config = config
        self.spool = Spool(config.spool_path, config.spool_max_bytes)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sd3serve-upload")
        self._held: list[_Held] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._retry_thread: threading.Thread | None = None
        self._largest = 0

    @property
    def waiting(self) -> int:
        """Images held on disk, waiting for storage to come back."""
        return len(self._held)

    @property
    def spool_full(self) -> bool:
        """Whether another image like the largest so far would not fit in the spool."""
        return bool(self._held) and self.spool.bytes + self._largest > self.spool.max_bytes

    def submit(self, job_id: str, image: Any, spec: ImageJob | None = None, index: int = 0) -> "Future[StoredImage]":
        """Encode and store image `index` of a job in the pool's threads (in `spec`'s format)."""
        future: Future[StoredImage] = Future()
        made_at = time.monotonic()
        self._pool.submit(self._first_try, job_id, image, made_at, future, spec, index)
        return future

    def store(self, job_id: str, image: Any, made_at: float, spec: ImageJob | None = None, index: int = 0) -> StoredImage:
        """Store one image and wait for it (the stock-worker path). Raises StoreFailed."""
        future: Future[StoredImage] = Future()
        self._first_try(job_id, image, made_at, future, spec, index)
        return future.result()

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True  # the retry thread ends; the worker requeues what it still holds
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for held in list(self._held):
            self._settle(held, error=StoreFailed("storage_unavailable", "the worker stopped while storage was down", retry=True))

    # -- the first try, in the pool ---------------------------------------------------------------
    def _first_try(
        self, job_id: str, image: Any, made_at: float, future: "Future[StoredImage]", spec: ImageJob | None = None, index: int = 0
    ) -> None:
        try:
            output_format = spec.output_format if spec else "png"
            seed = spec.seeds[index] if spec else None
            key = keys.image_key(self.config.key_prefix, job_id, index, output_format)
            data = encode_image(image, output_format, spec.output_compression if spec else None)
            self._largest = max(self._largest, len(data))
            start = time.monotonic()
            delays = iter(self.config.retry.delays())
            tries, exc = self._try(key, lambda: data)
            if exc is None:
                future.set_result(
                    StoredImage(
                        key=key, url=self.storage.url(key), tries=tries, seconds=time.monotonic() - start, index=index, seed=seed
                    )
                )
                return
            path = self.spool.keep(data)
            if path is None:
                log.error("spool full (%d bytes held); cannot keep %s: %s", self.spool.bytes, key, exc)
                raise StoreFailed(
                    "storage_unavailable",
                    "storage is unreachable and this worker holds as many images as it may; the job is retried",
                    retry=True,
                )
            held = _Held(
                key, path, len(data), made_at + self.config.storage_deadline, start, future, delays, tries, index=index, seed=seed
            )
            log.warning("storage unavailable (%s); holding %s on disk (%d bytes held)", exc, key, self.spool.bytes)
            self._hold(held)
        except StoreFailed as failure:
            future.set_exception(failure)
        except Exception:  # never leave a job's future unset
            log.exception("storing the image of job %s failed", job_id)
            future.set_exception(StoreFailed("storage_error", "the image could not be stored (see the worker log)", retry=True))

    def _try(self, key: str, read: Callable[[], bytes]) -> tuple[int, StorageError | None]:
        """One put (two if the bucket had to be created again). Returns (tries, the transient error or None);
        raises StoreFailed for errors retrying cannot fix."""
        tries = 0
        for recreate in (True, False):
            tries += 1
            try:
                self.storage.put(key, read(), content_type=CONTENT_TYPES[key.rsplit(".", 1)[-1]])
                return tries, None
            except StorageError as exc:
                if exc.missing_bucket and recreate and self._recreate_bucket(exc):
                    continue
                if not exc.transient:
                    log.error("storage refused %s: %s", key, exc)
                    raise _refused(exc) from None
                return tries, exc
        raise AssertionError("unreachable")

    # -- held images, in the retry thread ---------------------------------------------------------
    def _hold(self, held: _Held) -> None:
        if not self._schedule(held, None):
            return
        with self._wake:
            stopped = self._stopped
            if not stopped:
                self._held.append(held)
                if self._retry_thread is None:
                    self._retry_thread = threading.Thread(target=self._retry_loop, name="sd3serve-storage-retry", daemon=True)
                    self._retry_thread.start()
                self._wake.notify_all()
        if stopped:
            self._settle(held, error=StoreFailed("storage_unavailable", "the worker stopped while storage was down", retry=True))

    def _schedule(self, held: _Held, exc: StorageError | None) -> bool:
        """Set the next try; False (and the job failed) if it would fall past the deadline."""
        delay = next(held.delays, self.config.retry.max_backoff)
        if time.monotonic() + delay > held.deadline:
            log.error(
                "giving up on %s after %d tries (deadline %.0f s): %s", held.key, held.tries, self.config.storage_deadline, exc
            )
            self._settle(
                held,
                error=StoreFailed(
                    "storage_unavailable",
                    f"the image was made but storage stayed unreachable for {self.config.storage_deadline:.0f} s",
                    retry=True,
                ),
            )
            return False
        held.next_try = time.monotonic() + delay
        return True

    def _retry_loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._due():
                    pending = [h.next_try for h in self._held]
                    self._wake.wait(max(min(pending) - time.monotonic(), 0.01) if pending else None)
                if self._stopped:
                    return
                due = self._due()
            for held in due:
                try:
                    tries, exc = self._try(held.key, held.path.read_bytes)
                except StoreFailed as failure:
                    self._settle(held, error=failure)
                    continue
                held.tries += tries
                if exc is None:
                    log.info("stored %s after %d tries (%.1f s held)", held.key, held.tries, time.monotonic() - held.started)
                    self._settle(
                        held,
                        result=StoredImage(
                            key=held.key,
                            url=self.storage.url(held.key),
                            tries=held.tries,
                            seconds=time.monotonic() - held.started,
                            index=held.index,
                            seed=held.seed,
                        ),
                    )
                elif self._schedule(held, exc):
                    log.warning("storing %s failed (try %d): %s", held.key, held.tries, exc)

    def _due(self) -> list[_Held]:
        now = time.monotonic()
        return [h for h in self._held if h.next_try <= now]

    def _settle(self, held: _Held, result: StoredImage | None = None, error: StoreFailed | None = None) -> None:
        with self._wake:
            if held in self._held:
                self._held.remove(held)
        self.spool.drop(held.path, held.size)
        if held.future.done():
            return
        if result is not None and error is None:
            held.future.set_result(result)
        else:
            held.future.set_exception(error or StoreFailed("storage_error", "the upload ended without a result", True))

    def restore_bucket(self) -> None:
        """Create the bucket again if it was deleted (the worker calls this every maintenance pass)."""
        if self.config.backend != "s3" or not self.config.s3_create_bucket:
            return
        try:
            self.storage.ensure_ready()
        except StorageError as exc:
            log.warning("storage not ready: %s", exc)

    def _recreate_bucket(self, exc: StorageError) -> bool:
        if not self.config.s3_create_bucket:
            return False
        log.warning("the bucket is gone (%s); creating it again", exc)
        try:
            self.storage.ensure_ready()
            return True
        except StorageError as again:
            log.error("could not create the bucket again: %s", again)
            return False


def _refused(exc: StorageError) -> StoreFailed:
    if exc.missing_bucket:
        return StoreFailed(
            "storage_bucket_missing",
            "the storage bucket does not exist and the worker may not create it (SD3SERVE_S3_CREATE_BUCKET=0)",
            retry=False,
        )
    return StoreFailed("storage_error", f"storage refused the image ({exc.code or 'see the worker log'})", retry=False)
