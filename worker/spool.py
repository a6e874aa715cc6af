"""The spool: images waiting on the worker's disk for storage to come back, bounded in bytes."""

from __future__ import annotations

import builtins
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("sd3serve.storage")


class Spool:
    """PNG files waiting for storage, in one folder, at most `max_bytes` in all (thread-safe)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def keep(self, data: builtins.bytes) -> Path | None:  # `bytes` is a property here
        """Write `data` to a spool file; None if that would exceed the bound (or the disk fails)."""
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                return None
            self._bytes += len(data)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(suffix=".png", dir=self.directory)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return Path(name)
        except OSError as exc:
            log.error("could not spool an image to %s: %s", self.directory, exc)
            self._release(len(data))
            return None

    def drop(self, path: Path, size: int) -> None:
        try:
            path.unlink(missing_ok=True)
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        with self._lock:
            self._bytes -= size
