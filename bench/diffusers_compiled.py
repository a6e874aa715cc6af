"""The `diffusers-compiled` part of bench/engine_bench.py's `Bench`: diffusers at its documented
best, the honest baseline next to eager diffusers.

diffusers' recipe for SD3 (docs: "Speed up inference" / torch.compile): fused QKV projections in
the transformer and the VAE, `torch.compile` of the transformer and of `vae.decode` (default
mode, `fullgraph=True`). It runs on copies of the transformer and the VAE, so the pipeline the
engine parts use stays untouched; the originals wait on the host meanwhile, so the peak memory of
these rows counts one model. Every measured (size, batch) is first run once untimed: that call
compiles (or recompiles) for the shape, and its seconds go into the row as `compile_seconds`.
"""

from __future__ import annotations

import copy
import gc
import logging

import torch

from bench.measure import relative_error
from bench.parts_base import BenchParts
from bench.runs import requests, row, run_diffusers

log = logging.getLogger("bench")
SYSTEM = "diffusers-compiled"
RECIPE = (
    "transformer.fuse_qkv_projections(); vae.fuse_qkv_projections(); "
    "torch.compile(transformer, fullgraph=True); vae.decode = torch.compile(vae.decode, fullgraph=True)"
)


def compiled_diffusers_pipeline(pipe, backend: str = "inductor", mode: str | None = None, vae_backend: str | None = None):
    """A pipeline sharing `pipe`'s text encoders, tokenizers and scheduler, with its own fused and
    compiled copies of the transformer and the VAE (`vae_backend`: default `backend`)."""
    transformer = copy.deepcopy(pipe.transformer)
    vae = copy.deepcopy(pipe.vae)
    transformer.fuse_qkv_projections()
    vae.fuse_qkv_projections()
    compiled = type(pipe)(**dict(pipe.components, transformer=transformer, vae=vae))
    compiled.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    compiled.transformer = torch.compile(transformer, backend=backend, mode=mode, fullgraph=True)
    vae.decode = torch.compile(vae.decode, backend=vae_backend or backend, mode=mode, fullgraph=True)
    return compiled


def _allow_recompiles(limit: int = 64) -> None:
    """Every (size, batch) may compile its own graph: don't fall back to eager after 8."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


class DiffusersCompiledPart(BenchParts):
    """Mixed into `Bench`; runs before any engine wraps or compiles the pipeline."""

    def diffusers_compiled_part(self) -> None:
        a = self.args
        _allow_recompiles()
        backend = self.fast.backend
        # On the CPU (smoke runs) aot_eager's VAE decode trips over a GroupNorm layout check in
        # torch; dynamo's own capture (backend "eager") still checks the decoder traces whole.
        vae_backend = "eager" if self.device.type == "cpu" else backend
        compiled = compiled_diffusers_pipeline(self.pipe, backend, vae_backend=vae_backend)
        originals = (self.pipe.transformer, self.pipe.vae)
        for module in originals:
            module.to("cpu")
        compile_seconds: dict[str, float] = {}
        try:
            for size in a.sizes:
                for batch in a.batches:
                    warm, _ = run_diffusers(compiled, self.device, requests("cw", batch, size, 2))
                    compile_seconds[f"{size}_b{batch}"] = round(warm.seconds, 2)
                    log.info("diffusers-compiled %d² batch %d: warm-up (compile) %.1f s", size, batch, warm.seconds)
                    for rep in range(self.reps(batch)):
                        run, _ = run_diffusers(compiled, self.device, requests(f"c{rep}", batch, size, a.steps))
                        self.results.add(
                            "engine",
                            row(
                                SYSTEM,
                                "compiled",
                                self.model,
                                size,
                                batch,
                                a.steps,
                                run,
                                rep=rep,
                                compile_seconds=compile_seconds[f"{size}_b{batch}"],
                            ),
                        )
            if "accuracy" in a.parts:  # the baseline computes what eager diffusers does
                self.compiled_accuracy(compiled)
        finally:
            self.results.note(
                "diffusers_compiled",
                dict(
                    recipe=RECIPE,
                    backend=backend,
                    vae_backend=vae_backend,
                    mode="default",
                    warmup_seconds_per_shape=compile_seconds,
                    compile_seconds_total=round(sum(compile_seconds.values()), 1),
                ),
            )
            del compiled
            gc.collect()
            torch._dynamo.reset()  # the engine parts compile their own graphs from a clean cache
            for module in originals:
                module.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def compiled_accuracy(self, compiled) -> None:
        acc = dict(self.results.engine.get("accuracy", {}))
        for size in self.args.sizes:
            _, out = run_diffusers(compiled, self.device, self.accuracy_requests(size), output_type="latent")
            acc[f"diffusers_compiled_vs_eager_latents_{size}"] = relative_error(
                out.images.float().cpu(), self.diffusers_latents[size]
            )
        self.results.note("accuracy", acc)
