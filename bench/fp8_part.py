"""The FP8 rows of bench/engine_bench.py's e2e part (`--fp8`): the engine's fast path with the
transformer blocks' linears in FP8 (engine/precision.py), exact (`exact-fp8`) and with the default
caching, `attention` K=3 (`attention-k3-fp8`); and with `accuracy`, the FP8 error against bf16.

The FP8 engine gets its own copy of the transformer, taken before any engine touched the
pipeline and kept on the host until its turn; the VAE and the text encoders are the fast engine's
(already compiled), shared. The fast bf16 engine stays on the card meanwhile (its CUDA graphs
point at its weights), so these rows' peak memory includes `bf16_resident_gb` of bf16 weights.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import replace

import torch

from bench.measure import GIB, relative_error, timed
from bench.parts_base import BenchParts
from bench.runs import capture_latents, make_engine, requests
from engine.precision import require_precision


class Fp8Part(BenchParts):
    """Mixed into `Bench`; `keep_fp8_source` runs right after the pipeline is built."""

    fp8_source: torch.nn.Module | None = None

    def check_fp8(self) -> None:
        """Refuse before building anything when this machine can't run FP8."""
        require_precision("fp8", self.device)

    def keep_fp8_source(self) -> None:
        self.fp8_source = copy.deepcopy(self.pipe.transformer).to("cpu")

    def fp8_engine(self):
        assert self.fp8_source is not None, "keep_fp8_source() runs before the engines are built"
        transformer, self.fp8_source = self.fp8_source.to(self.device), None
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pipe = type(self.pipe)(**dict(self.pipe.components, transformer=transformer))
        # the shared VAE and text encoders are already sped up by the fast engine
        speed = replace(self.fast, precision="fp8", text_compile=False, vae_compile=False, vae_group_norm=False)
        engine = make_engine(pipe, self.device, self.dtype_name, max(self.args.batches), speed)
        warm = {}
        for size in self.args.sizes:
            run = timed(self.device, lambda: engine.generate(requests("warm8", 2, size, 3)))
            warm[f"exact_{size}"] = round(run.seconds, 2)
        run = timed(self.device, lambda: engine.generate(requests("warm8", 2, min(self.args.sizes), 6, k=2, policy="attention")))
        warm["attention"] = round(run.seconds, 2)
        self.results.note(
            "fp8", dict(warmup_seconds=warm, speed=repr(speed), fp8_linears=engine.speed_applied.get("fp8_linears"))
        )
        return engine

    def fp8_part(self, e2e: bool, accuracy: bool, refs: dict | None) -> None:
        engine = self.fp8_engine()
        if accuracy and refs is not None:
            self.fp8_accuracy(engine, refs)
        if e2e:
            resident = sum(p.numel() * p.element_size() for p in self.pipe.transformer.parameters())
            self.engine_rows(engine, "exact-fp8", "attention-k3-fp8", bf16_resident_gb=round(resident / GIB, 3))
        del engine
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fp8_accuracy(self, engine, refs: dict) -> None:
        """Relative error of one FP8 transformer forward and of FP8 final latents against the
        eager bf16 engine on the same inputs and seeds (random weights: the numeric error only)."""
        acc = dict(self.results.engine.get("accuracy", {}))
        transformer = engine.pipe.transformer
        for size in self.args.sizes:
            inputs, ref = refs[size]
            with torch.inference_mode():
                out = transformer(**inputs, return_dict=False)[0].float().cpu()
            acc[f"fp8_vs_eager_forward_{size}"] = relative_error(out, ref)
            latents = capture_latents(engine)
            reqs = self.accuracy_requests(size)
            engine.generate(reqs)
            fp8 = torch.cat([latents[r.request_id] for r in reqs])
            acc[f"fp8_vs_eager_latents_{size}"] = relative_error(fp8, self.eager_latents[size])
            del engine.runner.decode
        self.results.note("accuracy", acc)
