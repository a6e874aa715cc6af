"""Replay a mixed-size serving run's arrivals through the real scheduler (tests/mixed_size_sim.py):
the same jobs at the same times, step costs fitted to the H200's step stream, and each way of
handling a job's prompt encoding the engine has had. CPU only, seconds.

    python -m bench.replay_mixed --call h6 --out bench/results/replay_mixed_h6.json

Step costs (device seconds, call h6's `steps` column): 512² 2 + 8 ms a request, 1024² 1.7 + 36.6
ms a request; per job 80 ms of prompt encoding (the first steps' excess over their batch's median)
and a decode of 20 / 60 ms (512² / 1024²). Two steps in flight, 4 ms of host time a step. What it
first rows leave out CUDA graph captures mid-run and the time from decode to the client (PNG,
storage, the API); the last three add them, as call h10's process had them and with every graphed
batch warmed before serving (SD3SERVE_WARM_SIZES).
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from dataclasses import replace
from pathlib import Path

from engine.request import GenerationRequest
from tests.mixed_size_sim import STEPS, JobCosts, p95_by_size, serve

RESULTS = Path("bench/results/serving_h200.json")
CAPTURE_SECONDS = 0.23  # a 512² step that captured its graph mid-run (calls h6, h10: 0.22-0.24 s)
GRAPHED_BATCH = {512: 4, 1024: 1}  # requests whose forward fits the 8192 graphed tokens (2 rows each)
FINISH_SECONDS = 0.15  # decode to client: a lone 512² job's p50 0.42 s against ~0.27 s of device work
MODES = ("charged", "in_step", "ahead")  # call h6's engine, call h9's, call h10's


def h200_step(size: int, batch: int) -> float:
    fixed, per_request = {512: (0.002, 0.008), 1024: (0.0017, 0.0366)}[size]
    return fixed + per_request * batch


def replay(jobs: list[list], costs: JobCosts, plan_lead: float = 0.0) -> dict[str, float]:
    """p95 seconds by size of `jobs` ([size, submitted, started, finished] rows of a serving run)."""
    arrivals = deque(
        (job[1], GenerationRequest(prompt="p", steps=STEPS, cache_interval=1, request_id=f"r{i}", width=job[0], height=job[0]))
        for i, job in enumerate(jobs)
    )
    by_size = serve(arrivals, max_in_flight=2, host_seconds=0.004, plan_lead=plan_lead, costs=costs)
    return {str(size): round(p95, 3) for size, p95 in sorted(p95_by_size(by_size).items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--call", default="h6", help="the serving run whose arrivals are replayed")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--encode", type=float, default=0.08, help="seconds of one job's prompt encoding")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = json.loads(args.results.read_text())["rows"]
    matching = [r for r in rows if r.get("call") == args.call and r["rate_per_s"] == args.rate and "+" in str(r["size"])]
    if not matching:
        raise SystemExit(f"no mixed-size row of call {args.call!r} at {args.rate} req/s in {args.results}")
    row = matching[-1]
    measured = {size: stats["p95_s"] for size, stats in row["by_size"].items()}
    out: dict = dict(call=args.call, rate_per_s=args.rate, system=row["system"], measured_p95_s=measured, replayed_p95_s={})
    for mode in MODES:
        costs = JobCosts(encode=args.encode, encode_mode=mode, decode={512: 0.02, 1024: 0.06}, step=h200_step)
        out["replayed_p95_s"][mode] = replay(row["jobs"], costs)
        out["replayed_p95_s"][f"{mode}+lead10"] = replay(row["jobs"], costs, plan_lead=0.01)
    # Call h10's process as it was: prompts ahead, graphs captured mid-run where its warm-up had
    # not (bench.serving_worker warmed 512² at batch 2 and 1024² at 1), ~0.15 s from decode to the
    # client; then with every graphed batch warmed first (SD3SERVE_WARM_SIZES, since h10).
    as_h10 = JobCosts(
        encode=args.encode,
        encode_mode="ahead",
        decode={512: 0.02, 1024: 0.06},
        step=h200_step,
        capture=CAPTURE_SECONDS,
        graphed=GRAPHED_BATCH,
        warm=frozenset({(512, 2), (1024, 1)}),
        finish=FINISH_SECONDS,
    )
    out["replayed_p95_s"]["ahead, h10's captures, finish"] = replay(row["jobs"], as_h10)
    warm = frozenset((size, b) for size, top in GRAPHED_BATCH.items() for b in range(1, top + 1))
    out["replayed_p95_s"]["ahead, all warm, finish"] = replay(row["jobs"], replace(as_h10, warm=warm))
    out["replayed_p95_s"]["ahead, all warm, finish, lead10"] = replay(row["jobs"], replace(as_h10, warm=warm), plan_lead=0.01)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
