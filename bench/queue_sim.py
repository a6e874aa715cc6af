"""How noisy one seeded open-loop window is near a single-job worker's capacity: a simulated
FIFO worker with a near-constant service time (the stock RQ baseline runs one job at a time),
Poisson arrivals, many seeds; the spread of the window's p95 latency and how often the window
counts as sustained (bench/serving_summary.py: images out >= 95 % of the offered rate).

    python -m bench.queue_sim --service 1.503 --extra 0.3 --rates 0.6,0.633,0.65 --windows 60,120
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.serving_summary import SUSTAINED


def window(rate: float, seconds: float, service: float, extra: float, seed: int) -> tuple[float, bool]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 2 + 20)))
    arrivals = arrivals[arrivals < seconds]
    free, latencies, ends = 0.0, [], []
    for at in arrivals:
        free = max(at, free) + service * rng.uniform(0.97, 1.03)
        latencies.append(free - at + extra)
        ends.append(free)
    out_rate = len(arrivals) / (max(ends) - arrivals[0])
    return float(np.percentile(latencies, 95)), out_rate >= SUSTAINED * rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service", type=float, default=1.503, help="seconds per job (1 / saturated jobs/s)")
    p.add_argument("--extra", type=float, default=0.3, help="seconds outside the worker (API, long-poll)")
    p.add_argument("--rates", default="0.6,0.633,0.65")
    p.add_argument("--windows", default="60,120")
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("bench/results/queue_sim.json"))
    args = p.parse_args(argv)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        for seconds in (float(w) for w in args.windows.split(",")):
            runs = [window(rate, seconds, args.service, args.extra, s) for s in range(args.seeds)]
            p95 = np.array([r[0] for r in runs])
            rows.append(
                dict(
                    rate_per_s=rate,
                    window_s=seconds,
                    p95_median_s=round(float(np.median(p95)), 2),
                    p95_quartiles_s=[round(float(q), 2) for q in np.percentile(p95, [25, 75])],
                    sustained_share=round(float(np.mean([r[1] for r in runs])), 3),
                )
            )
            print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(config=vars(args) | {"out": str(args.out)}, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
