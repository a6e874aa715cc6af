"""Serving under load: the whole stack (Redis, the API under uvicorn, one worker, local storage)
against what a user would run instead, driven by bench/load_test.py, one system at a time.

Systems: `sd3serve` (the batching worker; traffic at `cache_interval` 1 = exact and 3 with
`cache_policy="attention"`, the default caching when this benchmark began (issue 14 names it), so
every `sd3serve-k3` row measures the same thing; rows `sd3serve-exact` / `sd3serve-k3`), `rq-diffusers-compiled` and
`rq-diffusers-eager` (a stock RQ worker with a plain diffusers job, bench/rq_diffusers.py). For
each: a closed-loop saturation run (its maximum images/min), then open-loop Poisson runs at
`--rates` and at `--rate-fractions` of the saturated rate. Every run's row is merged into
`--out` (serving_<card>.json) with the call's label, and the summary recomputed.

    python -m bench.serving --system rq-diffusers-compiled --model random:sd3-medium --size 1024 \\
        --saturate 2 --rate-fractions 0.5,0.8,1.1,1.5 --out bench/results/serving_h200.json --call a
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.load_test import LoadConfig, run_load
from bench.serving_stack import Stack, card_name
from bench.serving_summary import save_rows

log = logging.getLogger("bench.serving")
SYSTEMS = ("sd3serve", "rq-diffusers-compiled", "rq-diffusers-eager")


def worker_command(args: argparse.Namespace, offline_out: Path) -> list[str]:
    sizes = ",".join(str(s) for s in args.size)
    if args.system == "sd3serve":
        cmd = [sys.executable, "-m", "bench.serving_worker"]  # its sizes warm up through SD3SERVE_WARM_SIZES
        if args.offline_batch:
            cmd += [
                "--offline-batch",
                str(args.offline_batch),
                "--offline-sizes",
                sizes,
                "--offline-steps",
                str(args.steps),
                "--offline-out",
                str(offline_out),
            ]
        return cmd
    cmd = [sys.executable, "-m", "bench.rq_diffusers", "--model", args.model, "--warm-sizes", sizes]
    return cmd + (["--compile"] if args.system == "rq-diffusers-compiled" else [])


def row_of(result: dict, system: str, call: str, size_label: str) -> dict:
    s, c = result["summary"], result["config"]
    return dict(
        system=system,
        size=size_label,
        mode=c["mode"],
        rate_per_s=c["rate"] or None,
        concurrency=c["concurrency"] or None,
        duration_s=c["duration_s"],
        cache_interval=c["cache_interval"],
        submitted=s["submitted"],
        rejected=s["rejected"],
        completed=s["completed"],
        failed=s["failed"],
        lost=s["lost"],
        duplicates=s["duplicates"],
        p50_s=s["p50_s"],
        p95_s=s["p95_s"],
        p99_s=s["p99_s"],
        queue_wait_s=s["queue_wait_s"],
        images_per_min=s["images_per_min"],
        gpu_busy=s["gpu_busy"],
        by_size=s["by_size"],
        call=call,
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        jobs=compact_jobs(result["jobs"]),
    )


def compact_jobs(jobs: list[dict]) -> list[list]:
    """[size, submitted, started, finished] per job, seconds after the run's first submission."""
    if not jobs:
        return []
    t0 = min(j["submit"] for j in jobs)

    def rel(value: float | None) -> float | None:
        return None if value is None else round(value - t0, 3)

    return [[j["size"], rel(j["submit"]), rel(j["started"]), rel(j["finished"])] for j in jobs]


CACHED_POLICY = "attention"


def run_system(args: argparse.Namespace) -> None:
    modes = sweep_modes(args)
    size_label = "+".join(str(s) for s in args.size)
    work = Path(tempfile.mkdtemp(prefix="sd3serve-serving-"))
    offline_out = work / "offline.json"
    env = {
        "SD3SERVE_MODEL": args.model,
        "SD3SERVE_MAX_BATCH": str(args.max_batch),
        "SD3SERVE_STEP_LOG_LEN": "100000",  # every step of a call stays readable for the rows' `steps`
        "SD3SERVE_WARM_SIZES": ",".join(str(s) for s in args.size),  # as a user serving these sizes sets it
        **args.worker_env,
    }
    try:
        with Stack(work, env, redis_server=args.redis_server, api_workers=args.api_workers) as stack:
            _serve(args, stack, modes, size_label, offline_out)
    finally:
        if args.logs_dir:  # the stack's logs, for the record (worker compile times, errors)
            args.logs_dir.mkdir(parents=True, exist_ok=True)
            for path in work.glob("*.log"):
                shutil.copy(path, args.logs_dir / f"{args.system}-{args.call}-{path.name}")


def _serve(args: argparse.Namespace, stack: Stack, modes: list, size_label: str, offline_out: Path) -> None:
    started = time.monotonic()
    stack.start_worker(worker_command(args, offline_out), name=args.system)
    stack.wait_for_worker(timeout=args.ready_timeout)
    ready_seconds = time.monotonic() - started
    base = LoadConfig(
        url=stack.api_url,
        duration_s=args.duration,
        max_seconds=args.max_seconds,
        sizes=tuple(args.size),
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        redis_url=stack.redis_url,
        concurrency=1,
    )
    warm = replace(base, concurrency=2, duration_s=0.5, max_requests=2 * len(args.size), max_seconds=900)
    run_load(warm)  # first jobs through the whole path (graph captures, allocator growth)
    offline = json.loads(offline_out.read_text()) if offline_out.exists() else None
    info = dict(
        system=args.system,
        model=args.model,
        ready_seconds=round(ready_seconds, 1),
        offline=offline,
        max_batch=args.max_batch,
        api_workers=args.api_workers,
        call=args.call,
    )
    for system, k in modes:
        saturated = None
        if args.saturate:
            sat = replace(
                base, concurrency=args.saturate, cache_interval=k, cache_policy=policy_of(k), duration_s=args.sat_duration
            )
            since = time.time()
            row = row_of(run_load(sat), system, args.call, size_label)
            row["mean_batch"] = stack.mean_batch_size(since) if args.system == "sd3serve" else 1.0
            save_rows(args.out, [row], info, card_name())
            saturated = row["images_per_min"] / 60.0
            log.info("%s saturated: %.3f images/s", system, saturated)
        rates = open_loop_rates(args, k) + [round(f * saturated, 3) for f in args.rate_fractions if saturated]
        for rate in rates:
            config = replace(base, concurrency=0, rate=rate, cache_interval=k, cache_policy=policy_of(k))
            since = time.time()
            row = row_of(run_load(config), system, args.call, size_label)
            if args.system == "sd3serve":  # which sub-batch ran when: how sizes shared the device
                row["steps"] = stack.steps_since(since)
            save_rows(args.out, [row], info, card_name())
            by_size = "".join(f", {size}² p95 {v['p95_s']} s" for size, v in (row.get("by_size") or {}).items())
            log.info(
                "%s at %.3f req/s: %s of %s completed, p95 %s s%s",
                system,
                rate,
                row["completed"],
                row["submitted"],
                row["p95_s"],
                by_size,
            )


def sweep_modes(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(row system name, cache interval) for each mode the call runs, in order: for sd3serve the
    `--cache-intervals`, or the intervals of `--mode-rates` in the order they were written."""
    suffix = f"+{args.variant}" if args.variant else ""
    if args.system != "sd3serve":
        return [(args.system + suffix, 1)]
    names = {1: f"sd3serve-exact{suffix}", 3: f"sd3serve-k3{suffix}"}
    intervals = list(args.mode_rates) if args.mode_rates else args.cache_intervals
    unknown = [k for k in intervals if k not in names]
    if unknown:
        raise SystemExit(f"cache intervals {unknown}: the serving bench runs 1 (exact) and 3 (default caching)")
    return [(names[k], k) for k in intervals]


def open_loop_rates(args: argparse.Namespace, cache_interval: int) -> list[float]:
    """The fixed open-loop rates of one mode: its `--mode-rates` entry, else `--rates`."""
    return list(args.mode_rates.get(cache_interval, [])) if args.mode_rates else list(args.rates)


def policy_of(cache_interval: int) -> str | None:
    """The `sd3serve-k3` rows' policy, named so that the presets behind a bare `cache_interval`
    (engine/cache_presets.py) do not change what the rows measure."""
    return CACHED_POLICY if cache_interval > 1 else None


def env_pair(text: str) -> tuple[str, str]:
    """'SD3SERVE_MIN_FRESH_PER_STEP=0' -> the pair; only SD3SERVE_* settings travel."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("SD3SERVE_"):
        raise argparse.ArgumentTypeError(f"{text!r}: write SD3SERVE_<SETTING>=<value>")
    return name, value


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def mode_rates(text: str) -> dict[int, list[float]]:
    """'3=0.6,1.1;1=0.9' -> {3: [0.6, 1.1], 1: [0.9]}."""
    out: dict[int, list[float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        interval, _, rates = part.partition("=")
        if not rates:
            raise argparse.ArgumentTypeError(f"{part!r}: write <cache interval>=<rate>,<rate>")
        out[int(interval)] = floats(rates)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", default="random:sd3-medium")
    p.add_argument("--size", type=int, action="append", help="square side; repeat for a mixed run")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument(
        "--cache-intervals",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1, 3],
        help="sd3serve: which of exact (1) and the default caching (3) to run",
    )
    p.add_argument("--saturate", type=int, default=0, help="closed-loop concurrency (0: no saturation run)")
    p.add_argument("--sat-duration", type=float, default=60.0)
    p.add_argument("--rates", type=floats, default=[], help="open-loop arrivals per second")
    p.add_argument(
        "--mode-rates",
        type=mode_rates,
        default={},
        help="sd3serve: open-loop rates per cache interval, e.g. '3=0.6,1.1;1=0.9,1.2'",
    )
    p.add_argument("--rate-fractions", type=floats, default=[], help="open-loop rates as fractions of saturation")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-seconds", type=float, default=400.0, help="hard cap per run, draining included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--offline-batch", type=int, default=0, help="sd3serve: offline yardstick at this batch")
    p.add_argument("--api-workers", type=int, default=2)
    p.add_argument("--redis-server", default=os.environ.get("SD3SERVE_REDIS_SERVER", "redis-server"))
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--worker-env",
        type=env_pair,
        action="append",
        default=[],
        help="an SD3SERVE_* setting for the worker (repeatable); name the rows with --variant",
    )
    p.add_argument(
        "--variant", default="", help="suffix of this call's row names (system+variant), e.g. for a --worker-env trial"
    )
    p.add_argument("--call", default="", help="label of this device call, kept in every row")
    p.add_argument("--logs-dir", type=Path, help="copy the stack's logs here at the end")
    args = p.parse_args(argv)
    args.size = args.size or [1024]
    if args.worker_env and not args.variant:
        p.error("--worker-env changes what the rows measure: name them with --variant")
    args.worker_env = dict(args.worker_env)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack's processes on the way out
    run_system(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
