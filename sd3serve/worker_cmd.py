"""`sd3serve worker`: one batching GPU worker on the Redis queue (one process per GPU).

Equivalent to `rq worker --worker-class worker.BatchWorker sd3serve`, with sd3serve's settings
as flags. Every flag has an SD3SERVE_* variable (flags win); see worker/config.py,
engine/config.py and worker/storage.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine.config import ATTENTION_PRECISION_SETTINGS, PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    queue = parser.add_argument_group("queue")
    queue.add_argument("--redis-url", help="Redis URL (SD3SERVE_REDIS_URL; default redis://127.0.0.1:6379/0)")
    queue.add_argument("--queue", help="queue name (SD3SERVE_QUEUE; default sd3serve)")
    queue.add_argument("--name", help="worker name (default: host.pid.random)")
    queue.add_argument("--burst", action="store_true", help="quit once the queue is empty")
    queue.add_argument("--max-idle-time", type=int, help="quit after this many idle seconds")
    queue.add_argument("--heartbeat-ttl", type=int, help="seconds before a dead worker's jobs are given back")
    queue.add_argument("--maintenance-interval", type=int, help="seconds between registry clean-ups")
    queue.add_argument("--shutdown-grace", type=float, help="on SIGTERM, seconds to finish the batch")
    queue.add_argument("--wait-for-redis", type=float, default=60.0, help="seconds to wait for Redis at start-up (default 60)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--model", help="diffusers SD3 pipeline folder or hub id (SD3SERVE_MODEL)")
    engine.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    engine.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    engine.add_argument("--max-batch", type=int, help="running requests at most")
    engine.add_argument("--admit-per-boundary", type=int, help="new requests per chunk boundary at most")
    engine.add_argument("--cache-policy", choices=("attention", "step"))
    engine.add_argument("--latent-aware", choices=("none", "seed", "extrapolate"))
    engine.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        help="the fast exact path (torch.compile, fused QKV); auto = on for CUDA (SD3SERVE_COMPILE)",
    )
    engine.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp8: the transformer's linears as FP8 GEMMs; needs compute capability >= 8.9 "
        "and torchao (SD3SERVE_PRECISION; default bf16)",
    )
    engine.add_argument(
        "--attention-precision",
        choices=ATTENTION_PRECISION_SETTINGS,
        help="fp8: attention with per-head FP8 Q/K/V through FlashAttention-3; needs a Hopper GPU (9.x) "
        "and fa3-fwd; auto: fp8 with --precision fp8 where it can run, else bf16 with a warning "
        "(SD3SERVE_ATTENTION_PRECISION; default auto)",
    )
    output = parser.add_argument_group("storage and metrics")
    output.add_argument("--storage", choices=("local", "s3"), help="where images go (SD3SERVE_STORAGE)")
    output.add_argument("--data-dir", help="local storage folder (SD3SERVE_DATA_DIR)")
    output.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)")
    output.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def build_config(args: argparse.Namespace):
    from worker.config import WorkerConfig

    return WorkerConfig.from_env(
        redis_url=args.redis_url,
        queue=args.queue,
        name=args.name,
        heartbeat_ttl=args.heartbeat_ttl,
        maintenance_interval=args.maintenance_interval,
        shutdown_grace=args.shutdown_grace,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        engine_overrides=dict(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            admit_per_boundary=args.admit_per_boundary,
            cache_policy=args.cache_policy,
            latent_aware=args.latent_aware,
            compile=args.compile,
            precision=args.precision,
            attention_precision=args.attention_precision,
        ),
        storage_overrides=dict(backend=args.storage, data_dir=args.data_dir),
    )


def wait_for_redis(url: str, seconds: float) -> None:
    import redis

    from worker.redis_conn import connect, display_url

    client = connect(url, socket_connect_timeout=2)
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise SystemExit(f"error: Redis at {display_url(url)} is not reachable: {exc}") from None
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from engine.precision import precision_problem

    problem = precision_problem(config.engine)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    wait_for_redis(config.redis_url, args.wait_for_redis)

    from worker.batch_worker import BatchWorker

    worker = BatchWorker(config=config)  # its queue and Redis connection come from the config
    try:
        worker.work(burst=args.burst, max_idle_time=args.max_idle_time, logging_level=config.log_level)
    except (OSError, ValueError) as exc:  # a bad model path or device, found at load time
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
