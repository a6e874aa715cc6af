"""The caching fidelity frontier, sd3serve beside cache-dit (issue 16): PSNR against speed-up.

Reads quality JSONs (bench/quality.py for sd3serve, bench/cache_dit_part.py `quality` for
cache-dit, the same held-out prompts) and, where they exist, GPU speed JSONs: sd3serve rows with
a `setting` from `engine_bench --parts caching --caching-settings ...` (bench/settings_speed.py),
cache-dit rows from `cache_dit_part speed`. A setting without a GPU row of the same steps, size
and batch gets its FLOP-ideal speed-up, labelled `speedup_source: "flops"`.

    python -m bench.caching_frontier --quality bench/results/caching_cpu_280.json \\
        --cache-dit bench/results/cache_dit_cpu_stride7.json --speed bench/results/caching_h200.json

Writes bench/results/caching_frontier.json and caching_frontier.png (summary: bench/frontier_summary.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cache_settings import CacheSetting, parse_setting
from bench.frontier_summary import FLOPS, PSNR_AT_1_5X_DB, PSNR_AT_2X_DB, Point, frontier_summary

RESULTS = Path("bench/results")


def row_setting(row: dict) -> str:
    """A bench/quality.py row's setting, canonical (engine-default warm-up and final steps left out)."""
    k, la = int(row["cache_interval"]), row["latent_aware"]
    knobs = (row.get("warmup_steps", 1), row.get("final_fresh_steps", 1), row.get("interval_growth", 0))
    return CacheSetting(row["policy"], k, la, *knobs).canonical()


def canonical_name(name: str) -> str:
    return parse_setting(name).canonical()


def speed_table(
    paths: list[Path],
    steps: int,
    size: int,
    batch: int,
    key,
    cached_steps: dict[str, float] | None = None,
    not_used: dict[str, str] | None = None,
) -> dict[str, tuple[float, str]]:
    """setting -> (speed-up, source) from GPU speed JSONs, rows at these steps, size and batch only.

    With `cached_steps` (setting -> mean steps cached in the quality run), a GPU row that cached a
    different number of steps measured another schedule (random weights make cache-dit's residual
    test decide differently), so it is skipped and the reason put in `not_used`."""
    table: dict[str, tuple[float, str]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        card = data.get("card") or data.get("device_name") or path.stem
        for row in data.get("rows", []):
            row_steps = row.get("steps", data.get("steps", data.get("config", {}).get("steps")))
            if "setting" not in row or row["setting"] == "exact" or row_steps != steps:
                continue
            if row.get("size", size) != size or row.get("batch", 1) != batch:
                continue
            name = key(row["setting"])
            expected = (cached_steps or {}).get(name)
            if expected is not None and abs(row.get("cached_steps", expected) - expected) > 0.5:
                if not_used is not None:
                    not_used[name] = (
                        f"{path}: the GPU run cached {row['cached_steps']} of {steps} steps, the quality run "
                        f"{expected:.2f}; FLOP-ideal speed-up kept"
                    )
                continue
            speedup = float(row.get("speedup_vs_exact", row.get("speedup")))
            table[name] = (speedup, f"gpu: {card} {size}² batch {batch}")
    return table


def _point(system: str, name: str, row: dict, exact_accuracy: float, speeds: dict[str, tuple[float, str]]) -> Point:
    """One frontier point from a quality row; the GPU speed-up of `name` if measured, else FLOP-ideal."""
    speedup, source = speeds.get(name, (1.0 / row["flop_fraction"], FLOPS))
    return Point(
        system,
        name,
        row["psnr_vs_exact"],
        row["ssim_vs_exact"],
        row["judge_accuracy"],
        round(exact_accuracy - row["judge_accuracy"], 6),
        row["flop_fraction"],
        speedup,
        source,
    )


def sd3serve_points(data: dict, speeds: dict[str, tuple[float, str]]) -> list[Point]:
    exact = data["exact_accuracy"]
    return [_point("sd3serve", row_setting(row), row, exact, speeds) for row in data["rows"] if row["policy"] != "exact"]


def cache_dit_points(data: dict, speeds: dict[str, tuple[float, str]]) -> list[Point]:
    exact = next(r["judge_accuracy"] for r in data["rows"] if r["setting"] == "exact")
    return [_point("cache-dit", row["setting"], row, exact, speeds) for row in data["rows"] if row["setting"] != "exact"]


def cache_dit_points_at_blocks(data: dict, blocks: int) -> list[Point]:
    """cache-dit's points with FLOP fractions for a transformer of `blocks` blocks: on a cached
    step DBCache still runs its first Fn and last Bn blocks, so it skips (blocks - Fn - Bn) of
    `blocks` rather than of the reference model's 6. FLOP-ideal, an upper bound of its speed-up."""

    def deeper(row: dict) -> dict:
        if row["setting"] == "exact":
            return row
        cached = row["cached_steps_mean"] / data["steps"]
        return dict(row, flop_fraction=1.0 - cached * (blocks - row["fn"] - row["bn"]) / blocks)

    return cache_dit_points(dict(data, rows=[deeper(row) for row in data["rows"]]), {})


def check_same_prompts(files: dict[Path, dict]) -> tuple[int, int]:
    """All quality files must hold the same prompt set (count and stride) and steps."""
    seen = {(d["prompts"], d.get("stride", 1), d["steps"]) for d in files.values()}
    if len(seen) != 1:
        described = ", ".join(
            f"{p}: {d['prompts']} prompts stride {d.get('stride', 1)} steps {d['steps']}" for p, d in files.items()
        )
        raise SystemExit(f"error: the quality files measure different prompt sets ({described})")
    prompts, _, steps = seen.pop()
    return prompts, steps


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for system, color in (("sd3serve", "tab:blue"), ("cache-dit", "tab:orange")):
        for measured in (True, False):
            sel = sorted((p for p in points if p.system == system and p.measured == measured), key=lambda p: p.speedup)
            if not sel:
                continue
            label = f"{system} ({'GPU-measured' if measured else 'FLOP-ideal'} speed-up)"
            ax.scatter(
                [p.speedup for p in sel],
                [p.psnr_db for p in sel],
                label=label,
                color=color,
                marker="o" if system == "sd3serve" else "s",
                facecolors=color if measured else "none",
            )
            for p in sel:
                ax.annotate(p.setting, (p.speedup, p.psnr_db), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(PSNR_AT_2X_DB, color="grey", lw=0.6, ls=":")
    ax.axhline(PSNR_AT_1_5X_DB, color="grey", lw=0.6, ls=":")
    ax.axvline(1.5, color="grey", lw=0.6, ls="--")
    ax.axvline(2.0, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("speed-up over exact")
    ax.set_ylabel("PSNR vs exact (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", type=Path, nargs="+", required=True, help="bench/quality.py JSONs (sd3serve)")
    parser.add_argument("--cache-dit", type=Path, nargs="*", default=[], help="cache_dit_part quality JSONs")
    parser.add_argument("--speed", type=Path, nargs="*", default=[], help="engine_bench caching JSONs with setting rows")
    parser.add_argument("--cache-dit-speed", type=Path, nargs="*", default=[], help="cache_dit_part speed JSONs")
    parser.add_argument(
        "--confirm",
        type=Path,
        nargs="*",
        default=[],
        help="bench/quality.py JSONs of sd3serve on a larger prompt set (e.g. all 280): their own summary, "
        "under summary_confirmed (cache-dit is compared on the --quality prompt set only)",
    )
    parser.add_argument(
        "--cache-dit-blocks",
        type=int,
        default=24,
        help="also compare cache-dit at this transformer depth (SD3-medium: 24), FLOP-ideal (summary_cache_dit_at_blocks)",
    )
    parser.add_argument("--size", type=int, default=1024, help="the GPU rows' image size to use")
    parser.add_argument("--batch", type=int, default=16, help="the GPU rows' batch to use")
    parser.add_argument("--out", type=Path, default=RESULTS / "caching_frontier.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = parser.parse_args(argv)

    for path in [*args.quality, *args.cache_dit, *args.speed, *args.cache_dit_speed, *args.confirm]:
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
    ours = {p: json.loads(p.read_text()) for p in args.quality}
    theirs = {p: json.loads(p.read_text()) for p in args.cache_dit}
    prompts, steps = check_same_prompts({**ours, **theirs})
    speeds = speed_table(args.speed, steps, args.size, args.batch, canonical_name)
    # cache-dit's speed mode runs batch 1 (cache-dit decides per pipeline call)
    cd_cached = {r["setting"]: r["cached_steps_mean"] for d in theirs.values() for r in d["rows"] if "cached_steps_mean" in r}
    cd_not_used: dict[str, str] = {}
    cd_speeds = speed_table(args.cache_dit_speed, steps, args.size, 1, lambda name: name, cd_cached, cd_not_used)
    points_ours = [p for data in ours.values() for p in sd3serve_points(data, speeds)]
    points_theirs = [p for data in theirs.values() for p in cache_dit_points(data, cd_speeds)]
    confirmed = None
    if args.confirm:
        files = {p: json.loads(p.read_text()) for p in args.confirm}
        confirm_prompts, confirm_steps = check_same_prompts(files)
        confirm_speeds = speed_table(args.speed, confirm_steps, args.size, args.batch, canonical_name)
        confirm_points = [p for data in files.values() for p in sd3serve_points(data, confirm_speeds)]
        confirmed = dict(
            prompts=confirm_prompts,
            exact_accuracy={str(p): d["exact_accuracy"] for p, d in files.items()},
            summary=frontier_summary(confirm_points, []),
            points=[p.as_dict() for p in confirm_points],
        )
    result = dict(
        description=(
            "Issue 16: caching fidelity frontier on the reference model. PSNR/SSIM vs exact on the same seeds and "
            "judge accuracy from the quality files; speed-up measured on the GPU where a speed row of the same "
            "setting, steps, size and batch exists (speedup_source 'gpu: ...'), else FLOP-ideal 1/flop_fraction "
            "(speedup_source 'flops'). cache-dit points without a GPU row are compared at their FLOP-ideal speed-up, "
            "an upper bound of their real one."
        ),
        prompts=prompts,
        steps=steps,
        size=args.size,
        batch=args.batch,
        sources=dict(
            quality=[str(p) for p in args.quality],
            cache_dit=[str(p) for p in args.cache_dit],
            speed=[str(p) for p in args.speed],
            cache_dit_speed=[str(p) for p in args.cache_dit_speed],
        ),
        cache_dit_speed_rows_not_used=cd_not_used,
        exact_accuracy={str(p): d["exact_accuracy"] for p, d in ours.items()},
        summary=frontier_summary(points_ours, points_theirs),
        points=[p.as_dict() for p in points_ours + points_theirs],
    )
    if confirmed:
        result["summary_confirmed"] = confirmed
    if args.cache_dit_blocks and theirs:
        deep = [p for data in theirs.values() for p in cache_dit_points_at_blocks(data, args.cache_dit_blocks)]
        compared = frontier_summary(points_ours, deep)
        result["summary_cache_dit_at_blocks"] = dict(
            blocks=args.cache_dit_blocks,
            dominates_cache_dit=compared["dominates_cache_dit"],
            cache_dit_not_dominated=compared["cache_dit_not_dominated"],
            points={p.setting: dict(flop_speedup=round(p.flop_speedup, 3), psnr_db=round(p.psnr_db, 3)) for p in deep},
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    title = f"reference model, {prompts} prompts, {steps} steps"
    plot(points_ours + points_theirs, args.plot or args.out.with_suffix(".png"), title)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
