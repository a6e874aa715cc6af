"""Images/s vs batch for each system and size, from bench/results/engine_<card>.json.

    python -m bench.plot bench/results/engine_h100.json   # writes engine_h100.png beside it
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    ("diffusers", "eager"): ("diffusers (eager)", "k", "o"),
    ("sd3serve", "exact-eager"): ("sd3serve exact, eager", "tab:gray", "s"),
    ("sd3serve", "exact-fast"): ("sd3serve exact, fast path", "tab:blue", "s"),
    ("sd3serve", "attention-k3-fast"): ("sd3serve attention cache K=3", "tab:orange", "^"),
    ("diffusers-compiled", "compiled"): ("diffusers (fused QKV + torch.compile)", "tab:brown", "o"),
    ("sd3serve", "exact-fp8"): ("sd3serve exact, FP8", "tab:green", "D"),
    ("sd3serve", "attention-k3-fp8"): ("sd3serve attention cache K=3, FP8", "tab:purple", "v"),
}


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


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["bench/results/engine_h100.json"]:
        print(plot(Path(arg)))
