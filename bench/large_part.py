"""The `large` part of bench/engine_bench.py: SD3.5-large at the largest size, diffusers vs the
fast engine, sharing the medium pipeline's text encoders and VAE."""

from __future__ import annotations

import gc

import torch

from bench import shapes
from bench.measure import relative_error, timed
from bench.runs import make_engine, requests, row, run_diffusers, run_engine
from bench.parts_base import BenchParts
from bench.shapes import forward_inputs


class LargeModelPart(BenchParts):
    """Mixin for `Bench`: needs `args`, `pipe`, `large`, `device`, `dtype`, `dtype_name`, `fast`,
    `results` and `note_flops`."""

    def large_part(self) -> None:
        a = self.args
        self.engine_fast = None
        gc.collect()
        self.pipe.vae.to(memory_format=torch.contiguous_format)  # diffusers gets the VAE as built:
        self.pipe.vae.decoder._compiled_call_impl = None  # not the fast path's compiled decoder either
        pipe = shapes.build_pipeline(self.large, self.device, self.dtype, shared=shapes.shared_parts(self.pipe))
        self.note_flops(pipe, self.large)
        self.pipe.transformer.to("meta")  # free the medium transformer's weights
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        size = max(a.sizes)
        inputs = forward_inputs(pipe.transformer, size, self.device, self.dtype)
        with torch.inference_mode():
            ref = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
        run_diffusers(pipe, self.device, requests("warm", 1, size, 2))
        for batch in a.large_batches:
            run, _ = run_diffusers(pipe, self.device, requests("dl", batch, size, a.steps))
            self.results.add("engine", row("diffusers", "eager", self.large, size, batch, a.steps, run))
        engine = make_engine(pipe, self.device, self.dtype_name, max(a.large_batches), self.fast)
        warm = timed(self.device, lambda: engine.generate(requests("warm", 1, size, 3)))
        self.results.note(
            "fast_warmup_seconds",
            dict(self.results.engine.get("fast_warmup_seconds", {}), **{f"large_{size}": round(warm.seconds, 2)}),
        )
        with torch.inference_mode():
            out = pipe.transformer(**inputs, return_dict=False)[0].float().cpu()
        self.results.note(
            "accuracy",
            dict(self.results.engine.get("accuracy", {}), **{f"large_fast_vs_eager_forward_{size}": relative_error(out, ref)}),
        )
        for batch in a.large_batches:
            run = run_engine(engine, self.device, requests("fl", batch, size, a.steps))
            self.results.add("engine", row("sd3serve", "exact-fast", self.large, size, batch, a.steps, run))
        engine.generate(requests("warm", 1, min(a.sizes), 2, k=3, policy="attention"))
        self.results.note("cache_memory_per_request", self.cache_memory(engine, self.large))
