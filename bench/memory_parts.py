"""The caching (issue 4) and memory parts of bench/engine_bench.py's `Bench`."""

from __future__ import annotations

import gc

import torch

from bench.cache_settings import CacheSetting
from bench.measure import GIB, synchronize
from bench.parts_base import BenchParts
from bench.runs import clear, requests, run_engine, step_time_all_rows
from bench.settings_speed import speed_rows


class CachingAndMemoryParts(BenchParts):
    """Mixed into `Bench`: uses its `args`, `device`, `model`, `engine_fast` and `results`."""

    def caching_part(self) -> None:
        a, engine = self.args, self.engine_fast
        if a.caching_settings:
            self.caching_settings_part()
            return
        modes = [
            ("exact", 1, None),
            ("attention", 2, "attention"),
            ("attention", 3, "attention"),
            ("attention", 4, "attention"),
            ("step", 5, "step"),
        ]
        engine.generate(requests("warm", 2, min(a.sizes), 6, k=5, policy="step"))
        for size in a.sizes:
            for batch in a.caching_batches:
                for mode, k, policy in modes[1:]:  # compile every plan shape before timing
                    engine.generate(requests(f"w{mode}{k}", batch, size, 8, k=k, policy=policy))
                t_exact = step_time_all_rows(engine, self.device, requests("ax", batch, size, a.steps), fresh=True)
                cached = requests("ac", batch, size, a.steps, k=8, policy="attention")
                t_cached = step_time_all_rows(engine, self.device, cached, fresh=False)
                skipping = requests("as", batch, size, a.steps, k=8, policy="step")
                t_skip = step_time_all_rows(engine, self.device, skipping, fresh=False)
                shares = dict(attention=t_cached / t_exact, step=t_skip / t_exact)
                exact_ms = None
                for mode, k, policy in modes:
                    run = run_engine(engine, self.device, requests(f"c{mode}{k}", batch, size, a.steps, k=k, policy=policy))
                    fresh = run.fresh_ratios[1:-1]
                    f = sum(fresh) / max(len(fresh), 1)
                    exact_ms = exact_ms or run.ms_per_step
                    share = shares.get(mode, 1.0)
                    ideal = 1 / (share + (1 - share) / k)
                    ideal_plan = 1 / (share + (1 - share) * f)
                    assert exact_ms is not None and run.ms_per_step is not None  # timed runs have steps
                    speedup = exact_ms / run.ms_per_step
                    self.results.add(
                        "caching",
                        dict(
                            mode=mode,
                            K=k,
                            size=size,
                            batch=batch,
                            ms_per_step=round(run.ms_per_step, 2),
                            speedup_vs_exact=round(speedup, 3),
                            ideal_speedup=round(ideal, 3),
                            fraction_of_ideal=round(speedup / ideal, 3),
                            fresh_ratio=round(f, 3),
                            ideal_speedup_at_fresh_ratio=round(ideal_plan, 3),
                            fraction_of_ideal_at_fresh_ratio=round(speedup / ideal_plan, 3),
                            a=round(share, 4),
                            exact_step_ms_direct=round(t_exact, 2),
                            all_cached_step_ms_direct=round(t_cached if mode != "step" else t_skip, 2),
                        ),
                    )

    def caching_settings_part(self) -> None:
        """`--caching-settings`: wall-clock speed-ups of named settings (bench/settings_speed.py)."""
        a = self.args

        def make(size: int):
            def make_requests(tag: str, n: int, setting: CacheSetting):
                policy = None if setting.policy == "exact" else setting.policy
                return requests(f"{tag}{size}", n, size, a.steps, k=setting.k, policy=policy)

            return make_requests

        for size in a.sizes:
            for batch in a.caching_batches:
                rows = speed_rows(self.engine_fast, self.device, a.caching_settings, make(size), size, batch, a.caching_admit)
                for row in rows:
                    self.results.add("caching", dict(row, steps=a.steps))
                    print(f"caching {row['setting']:36s} {size} b{batch}: x{row['speedup_vs_exact']}", flush=True)

    def memory_part(self) -> None:
        a = self.args
        per_request = self.cache_memory(self.engine_fast, self.model)
        self.results.note("cache_memory_per_request", per_request)
        self.results.note("max_batch", self.max_batch_probe(self.engine_fast, max(a.sizes)))

    def cache_memory(self, engine, model: str) -> dict:
        out = dict(self.results.engine.get("cache_memory_per_request", {}))
        for size in self.args.sizes:
            reqs = requests("cm", 2, size, 4, k=3, policy="attention")
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            for r in reqs:
                engine.add(r)
            engine.step()
            synchronize(self.device)
            after = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
            out[f"{model}_{size}"] = dict(
                formula_mb=round(engine.request_cache_bytes(reqs[0], "attention") / 2**20, 1),
                accounted_mb=round(engine.cache_bytes() / 2 / 2**20, 1),
                allocated_mb=round((after - before) / 2 / 2**20, 1),
            )
            clear(engine)
        return out

    def max_batch_probe(self, engine, size: int) -> dict:
        """Peak memory of one exact step at growing batches; the largest batch that fits is
        extrapolated linearly and then checked with one step at that batch."""
        if self.device.type != "cuda":
            return {}
        total = torch.cuda.get_device_properties(self.device).total_memory
        points = {}

        def one_step(n: int) -> int | None:
            engine.scheduler.max_batch = engine.scheduler.admit_per_boundary = max(n, engine.scheduler.max_batch)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            for r in requests(f"mb{n}", n, size, self.args.steps):
                engine.add(r)
            report = engine.step()
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            clear(engine)
            return None if report.failed else peak

        for n in self.args.probe_batches:
            points[n] = one_step(n)
        (n1, p1), (n2, p2) = sorted((n, p) for n, p in points.items() if p)[-2:]
        per_request = (p2 - p1) / (n2 - n1)
        fixed = p1 - per_request * n1
        predicted = int((total * 0.97 - fixed) // per_request)
        check = min(predicted, self.args.max_probe_batch)
        points[check] = one_step(check)
        return dict(
            size=size,
            total_gib=round(total / GIB, 2),
            step_peak_gib={n: None if p is None else round(p / GIB, 2) for n, p in points.items()},
            per_request_mib=round(per_request / 2**20, 1),
            fixed_gib=round(fixed / GIB, 2),
            predicted_max_batch=predicted,
            checked_batch=check,
            checked_fits=points[check] is not None,
        )
