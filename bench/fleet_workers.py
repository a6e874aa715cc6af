"""N fake GPU workers as N processes: the real `BatchWorker` (RQ registration, heartbeats,
progress, results, local storage) around a `FakeEngine` that sleeps a real step time.

The parent imports everything once, checks that torch is not loaded, then forks the workers,
so 256 of them start in seconds and share the imported code's memory. SIGTERM to the process
group stops them all (RQ's warm shutdown).

    python -m bench.fleet_workers --count 64 --step-seconds 0.45 --batch 14
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

import redis

from bench.fake_engine import H200_BATCH, H200_STEP_SECONDS, FakeEngine
from engine.config import limits_for_model
from worker.batch_worker import BatchWorker
from worker.config import WorkerConfig


def torch_loaded() -> bool:
    return "torch" in sys.modules


def run_fake_worker(index: int, config: WorkerConfig, step_seconds: float, batch: int) -> None:
    """One worker, in this process, until it is told to stop."""
    limits = limits_for_model(config.engine.limits, config.engine.model)
    engine = FakeEngine(limits, step_seconds=step_seconds, max_batch=batch)
    connection = redis.Redis.from_url(config.redis_url)
    worker = BatchWorker([config.queue], connection=connection, config=config, engine=engine, name=f"fake-{os.getpid()}-{index}")
    worker.work(logging_level=config.log_level)
    print(f"fake worker {index} exiting; torch loaded: {torch_loaded()}", flush=True)


def fork_fleet(count: int, config: WorkerConfig, step_seconds: float, batch: int) -> list[int]:
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the child: a worker, never back into the parent's code
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                run_fake_worker(index, config, step_seconds, batch)
            except BaseException:
                logging.getLogger("bench.fleet_workers").exception("fake worker %d died", index)
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--step-seconds", type=float, default=H200_STEP_SECONDS)
    p.add_argument("--batch", type=int, default=H200_BATCH, help="requests per fake worker's batch")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be >= 1")
    # device "cpu": on any other device BatchWorker samples GPU memory through torch every second.
    config = WorkerConfig.from_env().with_engine(device="cpu")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch_loaded():
        print("error: torch was imported by the fake workers' code", file=sys.stderr)
        return 3
    print(f"torch loaded: {torch_loaded()}; forking {args.count} fake workers", flush=True)
    gc.freeze()  # keep the collector from touching (and so copying) the parent's pages in every child
    pids = fork_fleet(args.count, config, args.step_seconds, args.batch)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = 0
    remaining = set(pids)
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        remaining.discard(pid)
        failed += os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM)
        if not stopping:
            print(f"fake worker {pid} exited early ({status})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
