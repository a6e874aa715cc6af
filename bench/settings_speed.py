"""GPU speed-up of named caching settings (bench/cache_settings.py) against the exact path, the
numbers bench/caching_frontier.py pairs with their fidelity on the reference model.

Each setting streams `2 x batch` requests through the fast engine the way a worker feeds them
(at most `batch` running, `admit_per_boundary` joining at each chunk boundary), so FRESH steps
fall as they do in bench/quality.py; the speed-up is the wall clock of the whole run (text
encoding, every step, VAE decode) of exact over the setting, on the same requests."""

from __future__ import annotations

from dataclasses import dataclass

from bench.cache_settings import EXACT, CacheSetting
from bench.measure import timed
from engine.engine import Engine
from engine.latent_aware import make_latent_aware
from engine.request import GenerationRequest


@dataclass
class SettingRun:
    seconds: float
    fresh_fraction: float  # mean over requests of FRESH steps / steps


def use_setting(engine: Engine, setting: CacheSetting) -> None:
    """Point a built engine at `setting`'s engine-wide knobs without rebuilding it (rebuilding
    would compile again). The attention cache keeps its history depth, so a strategy needing a
    deeper one than the engine was built with is refused."""
    strategy = make_latent_aware(setting.latent_aware)
    if setting.policy == "attention" and strategy.history > engine.latent_aware.history:
        raise ValueError(
            f"{setting.name}: needs {strategy.history} cached refreshes, the engine keeps {engine.latent_aware.history}"
        )
    scheduler = engine.scheduler
    scheduler.warmup_steps = engine.config.warmup_steps if setting.warmup is None else setting.warmup
    scheduler.final_fresh_steps = engine.config.final_fresh_steps if setting.final is None else setting.final
    scheduler.interval_growth = engine.config.interval_growth if setting.growth is None else setting.growth
    scheduler.extrapolation_order = strategy.order
    scheduler.extrapolation_times = engine.sigmas_of if strategy.clock == "sigma" else None
    engine.runner.latent_aware = strategy


def run_setting(engine: Engine, device, setting: CacheSetting, reqs: list[GenerationRequest]) -> SettingRun:
    """Stream `reqs` through `engine` under `setting`; wall clock and FRESH share per request."""
    use_setting(engine, setting)
    fresh: dict[str, int] = {}

    def record(report) -> None:
        fresh.update({item.request.request_id: item.fresh_steps for item in report.finished})

    run = timed(device, lambda: engine.generate(reqs, progress=record))
    fractions = [fresh[r.request_id] / r.steps for r in reqs]
    return SettingRun(run.seconds, sum(fractions) / len(fractions))


def speed_rows(
    engine: Engine, device, settings: list[CacheSetting], make_requests, size: int, batch: int, admit: int
) -> list[dict]:
    """One row per setting (exact first): `make_requests(tag, n, setting)` builds the requests."""
    scheduler = engine.scheduler
    saved = (scheduler.max_batch, scheduler.admit_per_boundary)
    scheduler.max_batch, scheduler.admit_per_boundary = batch, admit
    try:
        for setting in settings:  # compile every plan shape before timing
            run_setting(engine, device, setting, make_requests(f"w{setting.name}", batch, setting))
        exact = run_setting(engine, device, EXACT, make_requests("sx", 2 * batch, EXACT))
        rows = [_row(EXACT, size, batch, admit, exact, exact)]
        for setting in settings:
            run = run_setting(engine, device, setting, make_requests("s", 2 * batch, setting))
            rows.append(_row(setting, size, batch, admit, run, exact))
    finally:
        scheduler.max_batch, scheduler.admit_per_boundary = saved
        use_setting(engine, CacheSetting(engine.config.cache_policy, 2, engine.config.latent_aware))
    return rows


def _row(setting: CacheSetting, size: int, batch: int, admit: int, run: SettingRun, exact: SettingRun) -> dict:
    return dict(
        setting=setting.name,
        mode=setting.policy,
        K=setting.k,
        size=size,
        batch=batch,
        admit_per_boundary=admit,
        requests=2 * batch,
        seconds=round(run.seconds, 3),
        speedup_vs_exact=round(exact.seconds / run.seconds, 3),
        fresh_fraction=round(run.fresh_fraction, 4),
    )
