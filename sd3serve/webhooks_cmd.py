"""`sd3serve webhooks`: a webhook deliverer on its own, for fleets that want deliveries out of the
GPU workers' processes (each batching worker also runs one; `SD3SERVE_WEBHOOK_THREADS=0` turns
that off). Settings: SD3SERVE_REDIS_URL, SD3SERVE_QUEUE, SD3SERVE_WEBHOOK_*, and the storage
variables (presigned image URLs). SIGTERM or Ctrl-C stops it; claimed deliveries it could not
finish come due again for any deliverer."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (SD3SERVE_REDIS_URL)")
    parser.add_argument("--queue", help="the job queue whose webhooks to deliver (SD3SERVE_QUEUE; default sd3serve)")
    parser.add_argument("--threads", type=int, help="concurrent deliveries (SD3SERVE_WEBHOOK_THREADS; default 8)")
    parser.add_argument(
        "--log-level", default=os.environ.get("SD3SERVE_LOG_LEVEL", "INFO"), choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )


def run(args: argparse.Namespace) -> int:
    from redis import Redis

    from worker.keys import DEFAULT_QUEUE, DEFAULT_REDIS_URL
    from worker.storage import StorageConfig, storage_from_config
    from worker.webhook_config import WebhookConfig
    from worker.webhook_deliverer import Deliverer, image_url_function, status_json

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = WebhookConfig.from_env(threads=args.threads)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.enabled:
        print("error: set SD3SERVE_WEBHOOK_SECRET (a Standard Webhooks secret, whsec_...)", file=sys.stderr)
        return 2
    connection = Redis.from_url(args.redis_url or os.environ.get("SD3SERVE_REDIS_URL", DEFAULT_REDIS_URL))
    queue = args.queue or os.environ.get("SD3SERVE_QUEUE", DEFAULT_QUEUE)
    storage = storage_from_config(StorageConfig.from_env())
    body_for = status_json(connection, image_url_function(storage, config, connection))
    deliverer = Deliverer(connection, queue, config, body_for)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deliverer.start()
    logging.getLogger("sd3serve.webhooks").info("delivering webhooks of queue %s with %d threads", queue, config.threads)
    stop.wait()
    deliverer.stop(timeout=config.timeout + 5)
    return 0
