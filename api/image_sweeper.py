"""Local storage's answer to an S3 lifecycle rule: images older than the jobs' result TTL are
deleted (their job records are gone from Redis by then), and so are upload leftovers."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from worker.storage import LocalStorage

log = logging.getLogger("sd3serve.api")
PART_FILE_AGE = 3600  # seconds after which a half-written `.part` file is a leftover


def sweep(storage: LocalStorage, max_age: float, now: float | None = None) -> list[Path]:
    """Delete images under the storage root last written more than `max_age` seconds ago."""
    now = time.time() if now is None else now
    removed = []
    for path in storage.root.rglob("*"):
        try:
            if not path.is_file():
                continue
            limit = PART_FILE_AGE if path.name.endswith(".part") else max_age
            if now - path.stat().st_mtime > limit:
                path.unlink(missing_ok=True)
                removed.append(path)
        except OSError as exc:  # removed meanwhile, or unreadable: the next sweep tries again
            log.debug("sweep skipped %s: %s", path, exc)
    if removed:
        log.info("swept %d expired images from %s", len(removed), storage.root)
    return removed


async def sweep_forever(storage: LocalStorage, max_age: float, interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(sweep, storage, max_age)
        except Exception:  # never let the sweeper take the API down
            log.exception("image sweep failed")
        await asyncio.sleep(interval)
