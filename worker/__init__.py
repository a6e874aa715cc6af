"""The Redis queue side of sd3serve: key names, the Python client, storage and the batching
RQ worker.

`worker.BatchWorker` is loaded lazily so that the API (which imports `worker.client` and
`worker.keys`) never pulls in the worker's dependencies:
`rq worker --worker-class worker.BatchWorker sd3serve` resolves it through `__getattr__`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchWorker"]


def __getattr__(name: str) -> Any:
    if name == "BatchWorker":
        from worker.batch_worker import BatchWorker

        return BatchWorker
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
