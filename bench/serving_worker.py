"""sd3serve's batching worker for the serving benchmark, with the engine's offline yardstick.

It builds the engine from the same SD3SERVE_* settings as `sd3serve worker`, compiles it
(`warm_up`, as a real worker does before taking jobs), then times `engine.generate` offline —
`--offline-batch` requests arriving together, exact and with `--offline-cache-interval` — and
writes images/s to `--offline-out`. Then the very same engine object serves the queue through
the product's `BatchWorker`, so serving and the offline run share one compiled engine and the
worker's overhead (Redis, RQ bookkeeping, PNG encoding, storage) is a measured fraction.

    SD3SERVE_MODEL=random:sd3-medium python -m bench.serving_worker --offline-batch 16 --offline-out o.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.request import GenerationRequest

log = logging.getLogger("bench.serving_worker")


def offline_images_per_s(engine, batch: int, size: int, steps: int, cache_interval: int, reps: int) -> dict:
    """Best of `reps` runs of `batch` requests arriving together (after one untimed run)."""
    import torch

    def requests(tag: str) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                prompt=f"offline {tag} {i}",
                width=size,
                height=size,
                steps=steps,
                guidance_scale=7.0,
                seed=i,
                cache_interval=cache_interval,
                cache_policy="attention" if cache_interval > 1 else None,  # as bench/serving.py's rows
                request_id=f"offline-{tag}-{i}",
            )
            for i in range(batch)
        ]

    engine.generate(requests("warm"))
    times = []
    for rep in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(requests(str(rep)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(
        batch=batch,
        size=size,
        steps=steps,
        cache_interval=cache_interval,
        seconds=[round(t, 3) for t in times],
        images_per_s=round(batch / min(times), 4),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--offline-batch", type=int, default=0, help="0: no offline measurement")
    p.add_argument("--offline-sizes", default="1024")
    p.add_argument("--offline-steps", type=int, default=28)
    p.add_argument("--offline-cache-intervals", default="1,3")
    p.add_argument("--offline-reps", type=int, default=1)
    p.add_argument("--offline-out", type=Path)
    args = p.parse_args(argv)

    from engine.engine import Engine
    from worker.batch_worker import BatchWorker
    from worker.config import WorkerConfig

    config = WorkerConfig.from_env()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine.from_config(config.engine)
    warm_seconds = engine.warm_up()
    results: dict[str, Any] = dict(warm_up_seconds=round(warm_seconds, 1), runs=[])
    if args.offline_batch:
        for size in [int(s) for s in args.offline_sizes.split(",") if s]:
            for k in [int(s) for s in args.offline_cache_intervals.split(",") if s]:
                run = offline_images_per_s(engine, args.offline_batch, size, args.offline_steps, k, args.offline_reps)
                log.info("offline: %s", run)
                results["runs"].append(run)
    if args.offline_out:
        args.offline_out.write_text(json.dumps(results, indent=1))
    worker = BatchWorker(config=config, engine=engine)
    worker.work(logging_level=config.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
