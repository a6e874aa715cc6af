"""The end-to-end parts of bench/engine_bench.py's `Bench`: diffusers, the eager engine, the fast
engine exact and with the attention cache, and where the first step of a batch goes."""

from __future__ import annotations

import logging

import torch

from bench.measure import GIB, relative_error
from bench.probes import first_step_probe
from bench.parts_base import BenchParts
from bench.runs import capture_latents, make_engine, requests, row, run_diffusers, run_engine
from engine.speed import SpeedOptions


class EndToEndParts(BenchParts):
    """Mixed into `Bench`: uses its `args`, `device`, `dtype_name`, `model`, `pipe`,
    `engine_fast`, `reps` and `results`."""

    def diffusers_part(self, e2e: bool, accuracy: bool) -> None:
        a = self.args
        for size in a.sizes:
            run_diffusers(self.pipe, self.device, requests("warm", 1, size, 2))
            if e2e:
                for batch in a.batches:
                    for rep in range(self.reps(batch)):
                        run, _ = run_diffusers(self.pipe, self.device, requests(f"d{rep}", batch, size, a.steps))
                        self.results.add("engine", row("diffusers", "eager", self.model, size, batch, a.steps, run, rep=rep))
            if accuracy:
                _, out = run_diffusers(self.pipe, self.device, self.accuracy_requests(size), output_type="latent")
                self.diffusers_latents = getattr(self, "diffusers_latents", {})
                self.diffusers_latents[size] = out.images.float().cpu()

    def accuracy_requests(self, size: int):
        return requests("accuracy", 2, size, self.args.steps, seed=7, unique=False)

    def eager_part(self, e2e: bool, accuracy: bool) -> None:
        a = self.args
        engine = make_engine(self.pipe, self.device, self.dtype_name, max(a.batches), SpeedOptions())
        for size in a.sizes:
            engine.generate(requests("warm", 1, size, 2))
            if accuracy:
                latents = capture_latents(engine)
                reqs = self.accuracy_requests(size)
                engine.generate(reqs)
                self.eager_latents = getattr(self, "eager_latents", {})
                self.eager_latents[size] = torch.cat([latents[r.request_id] for r in reqs])
                err = relative_error(self.eager_latents[size], self.diffusers_latents[size])
                self.results.note(
                    "accuracy",
                    dict(self.results.engine.get("accuracy", {}), **{f"eager_engine_vs_diffusers_latents_{size}": err}),
                )
                del engine.runner.decode
            if e2e:
                for batch in a.eager_batches or a.batches:
                    for rep in range(self.reps(batch)):
                        run = run_engine(engine, self.device, requests(f"e{rep}", batch, size, a.steps))
                        self.results.add("engine", row("sd3serve", "exact-eager", self.model, size, batch, a.steps, run, rep=rep))

    def first_step_part(self) -> None:
        """Where the first step of 16 requests arriving together goes (prompt encoding, the step)."""
        found = {}
        for size in self.args.sizes:
            probe = first_step_probe(self.engine_fast, self.device, size, max(self.args.batches))
            for key in ("top_cpu", "top_cuda"):
                logging.getLogger("bench").info("first step %d %s:\n%s", size, key, probe.pop(key))
            found[str(size)] = probe
        self.results.note("first_step", found)

    def fast_part(self) -> None:
        self.engine_rows(self.engine_fast, "exact-fast", "attention-k3-fast")

    def engine_rows(self, engine, exact_mode: str, cached_mode: str, **extra) -> None:
        """Rows of a sped-up engine: exact at every size and batch, then `attention` K=3."""
        self.exact_rows(engine, exact_mode, **extra)
        self.cached_rows(engine, cached_mode, **extra)

    def exact_rows(self, engine, exact_mode: str, **extra) -> None:
        a = self.args
        for size in a.sizes:
            for batch in a.batches:
                # a shape's first batch captures its CUDA graph (a worker pays that once); the
                # compiled diffusers rows are timed after a warm-up at each shape too
                engine.generate(requests("fw", batch, size, 2))
                for rep in range(self.reps(batch)):
                    run = run_engine(engine, self.device, requests(f"f{rep}", batch, size, a.steps))
                    self.results.add(
                        "engine",
                        row(
                            "sd3serve",
                            exact_mode,
                            self.model,
                            size,
                            batch,
                            a.steps,
                            run,
                            rep=rep,
                            peak_steps_gb=round(run.peak_steps_bytes / GIB, 3),
                            **extra,
                        ),
                    )

    def cached_rows(self, engine, cached_mode: str, **extra) -> None:
        """`attention` K=3 at every size and batch."""
        a = self.args
        for size in a.sizes:
            for batch in a.batches:
                # A shape's first batch grows the attention cache's pools to its rows, on a first
                # step that runs the attention modules outside the compiled blocks (a worker pays
                # that once per capacity: `first_batch_first_step_ms`), and captures graphed
                # steps; timed after it, as the exact and compiled diffusers rows are.
                warm = run_engine(engine, self.device, requests("w3", batch, size, 8, k=3, policy="attention"))
                run = run_engine(engine, self.device, requests("k3", batch, size, a.steps, k=3, policy="attention"))
                fresh = run.fresh_ratios[1:-1]
                self.results.add(
                    "engine",
                    row(
                        "sd3serve",
                        cached_mode,
                        self.model,
                        size,
                        batch,
                        a.steps,
                        run,
                        fresh_ratio=round(sum(fresh) / max(len(fresh), 1), 3),
                        first_batch_first_step_ms=round(warm.step_ms[0], 1) if warm.step_ms else None,
                        **extra,
                    ),
                )
