"""The serving plot (like the seed paper's Figure 4): (a) end-to-end latency per arrival rate,
(b) images/min per arrival rate, every system at one size, from serving_<card>.json.

    python -m bench.serving_plot bench/results/serving_h200.json --size 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {
    "rq-diffusers-eager": ("tab:gray", "v"),
    "rq-diffusers-compiled": ("tab:orange", "s"),
    "sd3serve-exact": ("tab:blue", "o"),
    "sd3serve-k3": ("tab:green", "D"),
}


def plot(data: dict, size: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = [r for r in data["rows"] if r["size"] == size]
    top = max([r["rate_per_s"] for r in rows if r["mode"] == "open"] + [0.1])
    for system, (colour, marker) in STYLE.items():
        open_rows = sorted((r for r in rows if r["system"] == system and r["mode"] == "open"), key=lambda r: r["rate_per_s"])
        if not open_rows:
            continue
        rates = [r["rate_per_s"] for r in open_rows]
        lat.plot(rates, [r["p95_s"] for r in open_rows], marker=marker, color=colour, label=f"{system} p95")
        lat.plot(rates, [r["p50_s"] for r in open_rows], marker=marker, color=colour, ls=":", alpha=0.7)
        thr.plot(rates, [r["images_per_min"] for r in open_rows], marker=marker, color=colour, label=system)
        closed = [r for r in rows if r["system"] == system and r["mode"] == "closed"]
        if closed:
            thr.axhline(closed[-1]["images_per_min"], color=colour, ls="--", lw=0.8)
    thr.plot([0, top], [0, 60 * top], color="black", lw=0.6, ls=":", label="offered")
    lat.set(
        xlabel="arrival rate (requests/s, Poisson)",
        ylabel="end-to-end latency (s)",
        yscale="log",
        title=f"(a) latency: p95 solid, p50 dotted — {size}²",
    )
    thr.set(
        xlabel="arrival rate (requests/s, Poisson)", ylabel="images/min", title="(b) throughput; dashed: saturated (closed loop)"
    )
    lat.legend(fontsize=8)
    thr.legend(fontsize=8)
    for ax in (lat, thr):
        ax.grid(alpha=0.3)
    fig.suptitle(f"sd3serve vs RQ + diffusers, {data.get('card', '')}, random SD3-medium weights, 28 steps, CFG 7")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--size", default="1024")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or args.results.with_name(f"{args.results.stem}_{args.size}.png")
    plot(json.loads(args.results.read_text()), args.size, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
