"""Images/s vs batch for each system and size, from bench/results/engine_<card>.json, and the
seed paper's Figure 3 for SD3-medium: (a) seconds per image vs batch, (b) speed-up over diffusers.

    python -m bench.plot bench/results/engine_h200.json   # writes engine_h200.png and engine_h200_fig3.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    ("diffusers", "eager"): ("diffusers (eager)", "k", "o"),
    ("sd3serve", "exact-eager"): ("sd3serve exact, eager", "tab:gray", "s"),
    ("sd3serve", "exact-fast"): ("sd3serve exact, fast path", "tab:blue", "s"),
    ("sd3serve", "attention-k3-fast"): ("sd3serve attention cache K=3", "tab:orange", "^"),
    ("diffusers-compiled", "compiled"): ("diffusers (fused QKV + torch.compile)", "tab:brown", "o"),
    ("sd3serve", "exact-fp8-linears"): ("sd3serve exact, FP8 linears", "tab:green", "D"),
    ("sd3serve", "attention-k3-fp8-linears"): ("sd3serve K=3, FP8 linears", "tab:purple", "v"),
    ("sd3serve", "exact-fp8"): ("sd3serve exact, FP8 (linears + attention)", "tab:red", "d"),
    ("sd3serve", "attention-k3-fp8"): ("sd3serve K=3, FP8 (linears + attention)", "tab:red", "<"),
    ("xdit", "eager"): ("xDiT (xfuser, one GPU)", "tab:olive", "P"),
    ("xdit-compile", "compiled"): ("xDiT + torch.compile", "tab:cyan", "P"),
    ("stability-ref", "euler-cfg-fp16"): ("Stability SD3 reference (fp16)", "tab:pink", "*"),
}
FIG3_SYSTEMS = (
    ("diffusers", "eager"),
    ("diffusers-compiled", "compiled"),
    ("xdit", "eager"),
    ("xdit-compile", "compiled"),
    ("stability-ref", "euler-cfg-fp16"),
    ("sd3serve", "exact-fast"),
    ("sd3serve", "attention-k3-fast"),
)
ONE_AT_A_TIME = {("stability-ref", "euler-cfg-fp16")}  # its driver serves a list of prompts one by one


def plot(path: Path) -> Path:
    data = json.loads(path.read_text())
    panels = sorted({(r["model"], r["size"]) for r in data["rows"]}, key=lambda p: (p[0] != "sd3-medium", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (model, size) in zip(axes[0], panels):
        series: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        compiled = []  # runs that paid a compile inside the timing: marked, not joined to the line
        for r in data["rows"]:
            if (r["model"], r["size"]) == (model, size):
                if r.get("timed_run_included_compile"):
                    compiled.append((r["batch"], r["images_per_s"]))
                    continue
                series[(r["system"], r["mode"])][r["batch"]].append(r["images_per_s"])
        for key, points in series.items():
            label, color, marker = STYLE.get(key, (" ".join(key), None, "x"))
            batches = sorted(points)
            values = [sorted(points[b])[len(points[b]) // 2] for b in batches]
            ax.plot(batches, values, marker=marker, color=color, label=label)
        if compiled:
            ax.scatter(*zip(*compiled), marker="x", color="tab:red", label="timed run included a compile")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests per batch")
        ax.set_ylabel("images / s")
        ax.set_title(f"{model} {size}x{size}, 28 steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data.get('device_name', data['card'])}, torch {data['torch']}, diffusers {data['diffusers']}, bf16")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def _medians(rows: list[dict], size: int) -> dict[tuple, dict[int, float]]:
    """Median images/s per (system, mode) and batch of SD3-medium at `size` (runs that paid a
    compile inside the timing left out)."""
    points: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["model"] == "sd3-medium" and r["size"] == size and not r.get("timed_run_included_compile"):
            points[(r["system"], r["mode"])][r["batch"]].append(r["images_per_s"])
    return {key: {b: sorted(v)[len(v) // 2] for b, v in by_batch.items()} for key, by_batch in points.items()}


def figure3(path: Path) -> Path:
    """(a) seconds per image (a batch's time / its size) vs batch, (b) images/s over diffusers
    eager at the same batch; one column per size. A system whose driver runs one prompt at a time
    is measured at batch 1 and drawn dashed across: its time per image does not change."""
    data = json.loads(path.read_text())
    sizes = sorted({r["size"] for r in data["rows"] if r["model"] == "sd3-medium"})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 8), squeeze=False)
    for col, size in enumerate(sizes):
        ips = _medians(data["rows"], size)
        base = ips.get(("diffusers", "eager"), {})
        batches = sorted({b for by_batch in ips.values() for b in by_batch})
        for key in FIG3_SYSTEMS:
            if key not in ips:
                continue
            label, color, marker = STYLE[key]
            own = dict(ips[key])
            style = "-"
            if key in ONE_AT_A_TIME and set(own) == {1}:
                own = {b: own[1] for b in batches}
                style, label = "--", f"{label}, one prompt at a time"
            xs = sorted(own)
            axes[0][col].plot(xs, [1 / own[b] for b in xs], style, marker=marker, color=color, label=label)
            ratio = [b for b in xs if b in base]
            axes[1][col].plot(ratio, [own[b] / base[b] for b in ratio], style, marker=marker, color=color, label=label)
        for row_axes, ylabel in ((axes[0][col], "seconds per image"), (axes[1][col], "speed-up over diffusers (eager)")):
            row_axes.set_xscale("log", base=2)
            row_axes.set_xlabel("images per batch")
            row_axes.set_ylabel(ylabel)
            row_axes.grid(alpha=0.3)
        axes[0][col].set_title(f"(a) latency per image, SD3-medium {size}x{size}, 28 steps")
        axes[1][col].set_title(f"(b) speed-up over diffusers, {size}x{size}")
        axes[1][col].axhline(1.0, color="k", lw=0.8)
    legend: dict[str, Any] = {}  # one legend under the panels, so no curve hides behind it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{data.get('device_name', data['card'])}, torch {data['torch']}, diffusers {data['diffusers']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = path.with_name(path.stem + "_fig3.png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["bench/results/engine_h100.json"]:
        print(plot(Path(arg)))
        print(figure3(Path(arg)))
