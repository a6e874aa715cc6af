"""GPU benchmark of sd3serve's engine against diffusers' StableDiffusion3Pipeline, in one run.

Random weights at the real shapes (bench/shapes.py), 28 steps, CFG, 512² and 1024²:
- `e2e`: diffusers end to end (text encoders, 28 steps, VAE, PIL) at batch 1..16 (one call with
  that many prompts), then the engine on the same kind of requests arriving together: exact
  eager (no speed work), exact fast (engine/speed.py) and `attention` K=3; with `--fp8` also
  the fast path in FP8, exact and `attention` K=3 (bench/fp8_part.py); with `--fp8-attention` the
  same with FP8 attention too.
- `diffusers-compiled`: diffusers with its documented speed-ups (fused QKV, torch.compile of the
  transformer and `vae.decode`), warmed up at every shape (bench/diffusers_compiled.py).
- `xdit`, `stability-ref` (named only): xDiT eager and compiled around the same pipeline's parts
  (bench/xdit_part.py); Stability's reference sampler (bench/stability_part.py).
- `accuracy`: relative error of final latents (engine eager vs diffusers, fast vs eager) and of
  one transformer forward (fast vs eager, eager bf16 vs float32).
- `caching` (issue 4): steady step time of `attention` K=2,3,4 and `step` K=5 vs exact at batch
  4 and 8, against the ideal 1/(a + (1-a)/K) with a measured in the same run.
- `memory`: attention-cache bytes per request, and the largest exact batch that fits the card.
- `large`: SD3.5-large at 1024², diffusers vs the fast engine.
Order matters: diffusers runs on the untouched pipeline before any engine wraps or compiles it.

    python -m bench.engine_bench --out-dir bench/results            # on the GPU machine
    python -m bench.engine_bench --smoke --out-dir /tmp/smoke       # tiny model on the CPU

Writes engine_<card>.json and caching_<card>.json (rewritten as rows complete);
`python -m bench.plot` draws the PNG from them.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import shapes
from bench.shapes import forward_inputs
from bench.flops import step_flops
from bench.measure import card_name, matmul_tflops, relative_error, synchronize, timed
from bench.e2e_parts import EndToEndParts
from bench.engine_bench_args import parse_args
from bench.diffusers_compiled import DiffusersCompiledPart
from bench.fp8_part import Fp8Part
from bench import merge_rows
from bench.stability_part import StabilityRefPart
from bench.stability_ref import ReferenceUnavailable, load_reference
from bench.xdit_part import XditPart, XditUnavailable, import_xfuser
from bench.memory_parts import CachingAndMemoryParts
from bench.large_part import LargeModelPart
from bench.results_file import Results
from bench.probes import count_host_syncs, sdpa_probe
from bench.runs import GUIDANCE, capture_latents, make_engine, requests
from bench.ablation import ablation
from engine.precision import PrecisionUnavailable
from engine.speed import SpeedOptions


class Bench(EndToEndParts, DiffusersCompiledPart, XditPart, StabilityRefPart, Fp8Part, CachingAndMemoryParts, LargeModelPart):
    def __init__(self, args) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.dtype_name = "float32" if args.smoke else "bfloat16"
        self.model = "tiny" if args.smoke else "sd3-medium"
        self.large = "tiny" if args.smoke else "sd3.5-large"
        # Smoke runs check the bench's plumbing, so they compile with dynamo's own capture
        # (`eager`: same graphs, breaks and recompiles; a third of aot_eager's compile time on
        # the CPU). tests/test_speed.py runs the fast path through aot_eager.
        backend = "eager" if args.smoke else "inductor"
        overrides = dict(
            backend=backend,
            vae_compile=not args.no_vae_compile and not args.smoke,
            gelu_epilogue=not args.no_gelu_epilogue,
            cuda_graphs=not args.no_cuda_graphs,
            vae_compile_how=args.vae_compile_how,
            vae_group_norm=not args.no_vae_group_norm,
            split_queries=not args.joint_queries,
        )
        if args.sdpa:
            overrides["sdpa"] = tuple(args.sdpa.split(","))
        self.fast = SpeedOptions.fast(**overrides)
        card = args.card or card_name(self.device)
        meta = dict(
            card=card,
            device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor(),
            torch=torch.__version__,
            diffusers=__import__("diffusers").__version__,
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            config=dict(
                steps=args.steps,
                sizes=args.sizes,
                batches=args.batches,
                eager_batches=args.eager_batches or args.batches,
                stability_batches=args.stability_batches,
                large_batches=args.large_batches,
                guidance=GUIDANCE,
                dtype=self.dtype_name,
                speed=repr(self.fast),
                smoke=args.smoke,
                engine="admit_per_boundary = max_batch: requests arriving together all join at step 0",
            ),
        )
        keep_row = None
        if args.merge:

            def keep_row(which: str, row: dict) -> bool:  # drop only the rows this run makes again
                return merge_rows.keep_row(args, self.model, self.large, which, row)

        self.results = Results(Path(args.out_dir), card, meta, args.parts, keep_row)
        self.pipe = None
        self.engine_fast = None

    # -- parts ------------------------------------------------------------------------------
    def run(self) -> None:
        parts = self.args.parts
        t0 = time.perf_counter()
        fp8 = self.args.fp8 and bool({"e2e", "accuracy"} & set(parts))
        if fp8:
            self.check_fp8()
        if "xdit" in parts:  # refuse before building anything
            import_xfuser()
        if "stability-ref" in parts:
            load_reference()
        self.pipe = self.timed_note("build_seconds", lambda: shapes.build_pipeline(self.model, self.device, self.dtype))
        if fp8:
            self.keep_fp8_source()
        self.note_flops(self.pipe, self.model)
        if "probe" in parts:
            self.probe()
        if "ablation" in parts:
            self.results.note("ablation", ablation(self.pipe, self.device, self.dtype, self.args, self.fast))
            self.choose_gelu_epilogue()
            self.choose_vae_compile()
        refs = self.forward_reference() if "accuracy" in parts else None
        if "e2e" in parts or "accuracy" in parts:
            self.diffusers_part("e2e" in parts, "accuracy" in parts)
        if "diffusers-compiled" in parts:
            self.diffusers_compiled_part()
        if "xdit" in parts:
            self.xdit_part()
        if "stability-ref" in parts:
            self.stability_ref_part()
        if "e2e" in parts or "accuracy" in parts:
            self.eager_part("e2e" in parts, "accuracy" in parts)
        if {"accuracy", "e2e", "caching", "memory", "firststep"} & set(parts):
            self.engine_fast = self.fast_engine()
        if "accuracy" in parts:
            assert refs is not None
            self.fast_accuracy(refs)
        if "firststep" in parts:
            self.first_step_part()
        if "e2e" in parts:
            self.fast_part()
        if fp8:
            self.fp8_part("e2e" in parts, "accuracy" in parts, refs)
        if "caching" in parts:
            self.caching_part()
        if "memory" in parts:
            self.memory_part()
        if "large" in parts:
            self.large_part()
        self.results.note("total_seconds", round(time.perf_counter() - t0, 1))

    def reps(self, batch: int) -> int:
        """Repetitions of a timed run: more for the short small-batch runs (latency)."""
        return max(self.args.reps, self.args.small_reps) if batch <= 2 else self.args.reps

    def choose_gelu_epilogue(self) -> None:
        """Keep the GELU epilogue on the fast path only if the ablation measured it faster."""
        ms = self.results.engine["ablation"]["forward_ms"]
        with_epilogue = ms.get("compile+cudnn_sdpa+fused_qkv+gelu_epilogue", {})
        without = ms.get("compile+cudnn_sdpa+fused_qkv", {})
        keys = [k for k in with_epilogue if k in without and "rows2" not in k]
        if self.fast.gelu_epilogue and keys and sum(with_epilogue[k] for k in keys) > sum(without[k] for k in keys):
            self.fast = replace(self.fast, gelu_epilogue=False)
            self.results.note(
                "config", dict(self.results.engine["config"], speed=repr(self.fast), gelu_epilogue="off: slower in the ablation")
            )

    def choose_vae_compile(self) -> None:
        """Keep `--vae-compile` only if the ablation measured the compiled decoder faster."""
        ms = self.results.engine["ablation"].get("vae_decode_ms", {})
        compiled = ms.get(f"compiled_{self.fast.vae_compile_how}_b4", float("inf"))
        if self.fast.vae_compile and not compiled < ms.get("eager_b4", 0.0):
            self.fast = replace(self.fast, vae_compile=False)
            self.results.note(
                "config",
                dict(self.results.engine["config"], speed=repr(self.fast), vae_compile="off: not faster in the ablation"),
            )

    def note_flops(self, pipe, model: str) -> None:
        flops = dict(self.results.engine.get("transformer_flops_per_row", {}))
        for size in self.args.sizes:
            flops[f"{model}_{size}"] = step_flops(pipe.transformer.config, (size // 8, size // 8), shapes.TEXT_TOKENS).total
        self.results.note("transformer_flops_per_row", flops)

    def timed_note(self, key: str, fn):
        start = time.perf_counter()
        out = fn()
        synchronize(self.device)
        self.results.note(key, round(time.perf_counter() - start, 2))
        return out

    def probe(self) -> None:
        """The card's matmul rate and SDPA kernels on our shapes (the VAE's variants are in the ablation)."""
        info: dict = {}
        if self.device.type == "cuda":
            info["matmul_tflops_bf16"] = round(matmul_tflops(self.device), 1)
            info["sdpa_ms"] = sdpa_probe(self.device, self.args.sizes)
        self.results.note("probe", info)

    def forward_reference(self) -> dict:
        """One eager transformer forward per size on fixed random inputs (and a float32 copy's)."""
        refs = {}
        transformer = self.pipe.transformer
        for size in self.args.sizes:
            inputs = forward_inputs(transformer, size, self.device, self.dtype)
            with torch.inference_mode():
                refs[size] = (inputs, transformer(**inputs, return_dict=False)[0].float().cpu())
        size = max(self.args.sizes)
        if self.device.type == "cuda":
            inputs, _ = refs[size]
            fp32 = copy.deepcopy(transformer).float()
            with torch.inference_mode():
                out32 = fp32(**{k: v.float() for k, v in inputs.items()}, return_dict=False)[0].cpu()
            refs["fp32"] = (size, out32)
            del fp32
            gc.collect()
            torch.cuda.empty_cache()
        return refs

    def fast_engine(self):
        engine = make_engine(self.pipe, self.device, self.dtype_name, max(self.args.batches), self.fast)
        warm = {}
        for size in self.args.sizes:  # the first call compiles (dynamic shapes: later sizes reuse it)
            run = timed(self.device, lambda: engine.generate(requests("warm", 2, size, 3)))
            warm[f"exact_{size}"] = round(run.seconds, 2)
        # cached steps compile their variants: growing a pool, holds, extrapolations, all FRESH
        run = timed(self.device, lambda: engine.generate(requests("warm", 2, min(self.args.sizes), 6, k=2, policy="attention")))
        warm["attention"] = round(run.seconds, 2)
        self.results.note("host_syncs_per_step", count_host_syncs(engine, self.device, min(self.args.sizes)))
        # The worker's own warm-up (batch-1 shapes of the VAE and the text encoders; freezes the heap)
        warm["engine_warm_up"] = round(engine.warm_up(), 2)
        self.results.note("fast_warmup_seconds", dict(self.results.engine.get("fast_warmup_seconds", {}), **warm))
        return engine

    def fast_accuracy(self, refs: dict) -> None:
        acc = dict(self.results.engine.get("accuracy", {}))
        transformer = self.pipe.transformer
        fast_out = {}
        for size in self.args.sizes:
            inputs, ref = refs[size]
            with torch.inference_mode():  # outside a step the caching processors take the plain path
                out = transformer(**inputs, return_dict=False)[0].float().cpu()
            acc[f"fast_vs_eager_forward_{size}"] = relative_error(out, ref)
            fast_out[size] = out
        if "fp32" in refs:
            size, out32 = refs["fp32"]
            acc[f"eager_bf16_vs_fp32_forward_{size}"] = relative_error(refs[size][1], out32)
            acc[f"fast_bf16_vs_fp32_forward_{size}"] = relative_error(fast_out[size], out32)
        for size in self.args.sizes:
            latents = capture_latents(self.engine_fast)
            reqs = self.accuracy_requests(size)
            self.engine_fast.generate(reqs)
            fast = torch.cat([latents[r.request_id] for r in reqs])
            acc[f"fast_vs_eager_latents_{size}"] = relative_error(fast, self.eager_latents[size])
            acc[f"fast_vs_diffusers_latents_{size}"] = relative_error(fast, self.diffusers_latents[size])
            del self.engine_fast.runner.decode
        self.results.note("accuracy", acc)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    try:
        Bench(args).run()
    except (PrecisionUnavailable, XditUnavailable, ReferenceUnavailable) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
