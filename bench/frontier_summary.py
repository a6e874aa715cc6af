"""The caching fidelity frontier's points and summary (issue 16), pure Python.

A point is one caching setting of one system (sd3serve or cache-dit) measured on the reference
model (PSNR/SSIM vs the exact path on the same seeds, judge accuracy) with a speed-up: measured
on the GPU when a speed run of the same setting exists (`speedup_source` "gpu: ..."), else the
FLOP-ideal 1/flop_fraction (`speedup_source` "flops")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PSNR_AT_2X_DB = 30.0
SSIM_AT_2X = 0.95
ACCURACY_DROP_AT_2X = 0.01  # one point of judge accuracy
PSNR_AT_1_5X_DB = 35.0
FLOPS = "flops"


@dataclass(frozen=True)
class Point:
    system: str  # "sd3serve" or "cache-dit"
    setting: str
    psnr_db: float
    ssim: float
    judge_accuracy: float
    accuracy_drop: float  # the same run's exact accuracy minus this one's
    flop_fraction: float
    speedup: float
    speedup_source: str  # "gpu: <card> <size> batch <n>" or "flops"

    @property
    def measured(self) -> bool:
        return self.speedup_source != FLOPS

    @property
    def flop_speedup(self) -> float:
        return 1.0 / self.flop_fraction

    def as_dict(self) -> dict:
        return dict(asdict(self), flop_speedup=round(self.flop_speedup, 4))


def dominated_by(point: Point, others: list[Point], use_flops: bool = False) -> Point | None:
    """The best-PSNR point of `others` at least as fast and at least as faithful (PSNR) as `point`."""
    speed = (lambda p: p.flop_speedup) if use_flops else (lambda p: p.speedup)
    better = [o for o in others if speed(o) >= speed(point) - 1e-9 and o.psnr_db >= point.psnr_db]
    return max(better, key=lambda o: o.psnr_db) if better else None


def meets_2x_bar(p: Point) -> bool:
    return p.psnr_db >= PSNR_AT_2X_DB and p.ssim >= SSIM_AT_2X and p.accuracy_drop <= ACCURACY_DROP_AT_2X + 1e-9


def pick_at(points: list[Point], speedup: float, speed, bar) -> Point | None:
    """Among points at least `speedup` fast: the best PSNR of those meeting `bar`, else the best PSNR."""
    fast = [p for p in points if speed(p) >= speedup - 1e-9]
    if not fast:
        return None
    meeting = [p for p in fast if bar(p)]
    return max(meeting or fast, key=lambda p: (p.psnr_db, p.ssim, -p.accuracy_drop))


def summarize(sd3serve: list[Point], cache_dit: list[Point], use_flops: bool) -> dict:
    """The issue's summary keys over `sd3serve`'s points: measured speed-ups only (keys are None
    without them), or every point at its FLOP-ideal speed-up with `use_flops`."""
    if use_flops:
        candidates, speed = sd3serve, (lambda p: p.flop_speedup)
    else:
        candidates, speed = [p for p in sd3serve if p.measured], (lambda p: p.speedup)
    at_2x = pick_at(candidates, 2.0, speed, meets_2x_bar)
    at_1_5x = pick_at(candidates, 1.5, speed, lambda p: p.psnr_db >= PSNR_AT_1_5X_DB)
    # A cache-dit point without a GPU speed-up counts at its FLOP-ideal one, which its real
    # speed-up does not exceed: the comparison leans its way, never ours.
    not_dominated = [c.setting for c in cache_dit if dominated_by(c, candidates, use_flops) is None] if candidates else None
    return {
        "setting_at_2x": at_2x.setting if at_2x else None,
        "speedup_at_2x": round(speed(at_2x), 3) if at_2x else None,
        "best_psnr_at_2x_db": round(at_2x.psnr_db, 3) if at_2x else None,
        "best_ssim_at_2x": round(at_2x.ssim, 4) if at_2x else None,
        "accuracy_drop_at_2x": round(at_2x.accuracy_drop, 4) if at_2x else None,
        "meets_2x_bar": meets_2x_bar(at_2x) if at_2x else None,
        "setting_at_1_5x": at_1_5x.setting if at_1_5x else None,
        "speedup_at_1_5x": round(speed(at_1_5x), 3) if at_1_5x else None,
        "best_psnr_at_1_5x_db": round(at_1_5x.psnr_db, 3) if at_1_5x else None,
        "meets_1_5x_bar": at_1_5x.psnr_db >= PSNR_AT_1_5X_DB if at_1_5x else None,
        "cache_dit_points_compared": len(cache_dit),
        "dominates_cache_dit": (not not_dominated) if cache_dit and candidates else None,
        "cache_dit_not_dominated": not_dominated,
    }


def frontier_summary(sd3serve: list[Point], cache_dit: list[Point]) -> dict:
    """Measured keys at the top (None where the GPU has not measured a setting), the same keys
    at FLOP-ideal speed-ups under `flops_ideal`, and the bars they are held to."""
    measured = summarize(sd3serve, cache_dit, use_flops=False)
    return dict(
        measured,
        speedup_source="gpu" if any(p.measured for p in sd3serve) else None,
        flops_ideal=summarize(sd3serve, cache_dit, use_flops=True),
        bars=dict(
            psnr_at_2x_db=PSNR_AT_2X_DB,
            ssim_at_2x=SSIM_AT_2X,
            accuracy_drop_at_2x=ACCURACY_DROP_AT_2X,
            psnr_at_1_5x_db=PSNR_AT_1_5X_DB,
        ),
    )
