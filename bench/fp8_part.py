"""The FP8 rows of bench/engine_bench.py's e2e part (`--fp8`): the engine's fast path with the
transformer blocks' linears in FP8 (engine/precision.py) and bf16 attention, exact
(`exact-fp8-linears`) and with the default caching, `attention` K=3 (`attention-k3-fp8-linears`);
and with `accuracy`, the FP8 error against bf16 (keys `fp8_linears_vs_eager_*`). With
`--fp8-attention` also FP8 as `--precision fp8` runs on a Hopper GPU, FP8 attention as well
(engine/fp8_attention.py): `exact-fp8` and `attention-k3-fp8`, accuracy keys `fp8_vs_eager_*`.

Each FP8 engine gets its own copy of the transformer, taken before any engine touched the
pipeline and kept on the host until its turn; the VAE and the text encoders are the fast engine's
(already compiled), shared. The fast bf16 engine stays on the card meanwhile (its CUDA graphs
point at its weights), so these rows' peak memory includes `bf16_resident_gb` of bf16 weights.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import replace

import torch

from bench.measure import GIB, relative_error, timed
from bench.parts_base import BenchParts
from bench.runs import capture_latents, make_engine, requests
from engine.fp8_attention import require_attention_precision
from engine.precision import require_precision

log = logging.getLogger("bench.fp8")

# (row suffix and accuracy-key prefix, attention precision) of each FP8 engine
FP8_VARIANTS = (("fp8-linears", "bf16"), ("fp8", "fp8"))


class Fp8Part(BenchParts):
    """Mixed into `Bench`; `keep_fp8_source` runs right after the pipeline is built."""

    fp8_source: torch.nn.Module | None = None

    def check_fp8(self) -> None:
        """Refuse before building anything when this machine can't run FP8."""
        if self.args.fp8_attention:
            require_attention_precision("fp8", self.device)
        require_precision("fp8", self.device)

    def fp8_variants(self) -> list[tuple[str, str]]:
        return [v for v in FP8_VARIANTS if v[1] == "bf16" or self.args.fp8_attention]

    def keep_fp8_source(self) -> None:
        self.fp8_source = copy.deepcopy(self.pipe.transformer).to("cpu")

    def fp8_engine(self, attention_precision: str, last: bool):
        """An FP8 engine on a copy of the kept transformer (the copy itself for the `last` one)."""
        assert self.fp8_source is not None, "keep_fp8_source() runs before the engines are built"
        if last:
            transformer, self.fp8_source = self.fp8_source.to(self.device), None
        else:
            transformer = copy.deepcopy(self.fp8_source).to(self.device)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pipe = type(self.pipe)(**dict(self.pipe.components, transformer=transformer))
        # the shared VAE and text encoders are already sped up by the fast engine
        speed = replace(
            self.fast,
            precision="fp8",
            attention_precision=attention_precision,
            text_compile=False,
            vae_compile=False,
            vae_group_norm=False,
        )
        engine = make_engine(pipe, self.device, self.dtype_name, max(self.args.batches), speed)
        warm = {}
        for size in self.args.sizes:
            run = timed(self.device, lambda: engine.generate(requests("warm8", 2, size, 3)))
            warm[f"exact_{size}"] = round(run.seconds, 2)
            log.info("fp8 (attention %s) warm-up: exact %d² compiled in %.1f s", attention_precision, size, run.seconds)
        note = dict(warmup_seconds=warm, speed=repr(speed), fp8_linears=engine.speed_applied.get("fp8_linears"))
        self.results.note(self.fp8_note_key(attention_precision), note)
        return engine

    @staticmethod
    def fp8_note_key(attention_precision: str) -> str:
        return "fp8_linears" if attention_precision == "bf16" else "fp8"

    def warm_fp8_cached(self, engine, attention_precision: str) -> None:
        """Compile the cached steps' variants (minutes in FP8 on the H200: after the exact rows)."""
        run = timed(self.device, lambda: engine.generate(requests("warm8", 2, min(self.args.sizes), 6, k=2, policy="attention")))
        log.info("fp8 (attention %s) warm-up: cached steps compiled in %.1f s", attention_precision, run.seconds)
        key = self.fp8_note_key(attention_precision)
        note = dict(self.results.engine.get(key, {}))
        note["warmup_seconds"] = dict(note.get("warmup_seconds", {}), attention=round(run.seconds, 2))
        self.results.note(key, note)

    def fp8_part(self, e2e: bool, accuracy: bool, refs: dict | None) -> None:
        variants = self.fp8_variants()
        for i, (name, attention_precision) in enumerate(variants):
            engine = self.fp8_engine(attention_precision, last=i == len(variants) - 1)
            # exact rows first: each FP8 graph compiles for minutes on the H200 (call e7), so a
            # call cut short still returns them
            extra = {}
            if e2e:
                resident = sum(p.numel() * p.element_size() for p in self.pipe.transformer.parameters())
                extra = dict(bf16_resident_gb=round(resident / GIB, 3))
                self.exact_rows(engine, f"exact-{name}", **extra)
                self.warm_fp8_cached(engine, attention_precision)
                self.cached_rows(engine, f"attention-k3-{name}", **extra)
            if accuracy and refs is not None:
                self.fp8_accuracy(engine, refs, name.replace("-", "_"))
            del engine
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def fp8_accuracy(self, engine, refs: dict, prefix: str = "fp8") -> None:
        """Relative error of one FP8 transformer forward and of FP8 final latents against the
        eager bf16 engine on the same inputs and seeds (random weights: the numeric error only)."""
        acc = dict(self.results.engine.get("accuracy", {}))
        transformer = engine.pipe.transformer
        for size in self.args.sizes:
            inputs, ref = refs[size]
            with torch.inference_mode():
                out = transformer(**inputs, return_dict=False)[0].float().cpu()
            acc[f"{prefix}_vs_eager_forward_{size}"] = relative_error(out, ref)
            latents = capture_latents(engine)
            reqs = self.accuracy_requests(size)
            engine.generate(reqs)
            fp8 = torch.cat([latents[r.request_id] for r in reqs])
            acc[f"{prefix}_vs_eager_latents_{size}"] = relative_error(fp8, self.eager_latents[size])
            del engine.runner.decode
        self.results.note("accuracy", acc)
