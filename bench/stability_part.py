"""The `stability-ref` part of bench/engine_bench.py's `Bench`: Stability AI's SD3 reference
sampler (bench/stability_ref.py says what it runs and what differs from diffusers) at SD3-medium
shapes with random weights, 28 steps, CFG, fp16 autocast.

As its driver runs it, one image per sampling call (batch 1: two rows, uncond and cond); with
`--stability-batches` also several images per call through the same sampler (its driver never
does that; those rows say `batched_through_sampler`). A timed run is noise, the sampling loop,
the VAE decode and PIL images; not timed: text encoding (random conditioning) and the driver's
moves of the models between host and GPU per image (timed once, in the `stability_ref` note).
The diffusers pipeline waits on the host meanwhile, so peak memory counts the reference alone.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from bench import stability_ref as sr
from bench.measure import Run, StepClock, synchronize, timed
from bench.parts_base import BenchParts
from bench.runs import GUIDANCE, row

log = logging.getLogger("bench")
SYSTEM = "stability-ref"
MODE = "euler-cfg-fp16"


class StabilityRefPart(BenchParts):
    """Mixed into `Bench`."""

    def stability_ref_part(self) -> None:
        a = self.args
        ref = sr.load_reference()
        shape = sr.SHAPES[self.model]
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # the driver's fp16 weights
        model = vae = None
        self.pipe.to("cpu")
        try:
            model = sr.build_model(ref, shape, self.device, dtype)
            vae = sr.build_vae(ref, self.device, dtype)
            uncond = sr.random_conditioning(shape, 1, self.device, dtype, seed=0)  # the driver's one empty prompt
            moves = self._driver_moves_seconds(model)
            finite = {}
            for size in a.sizes:
                self._run(ref, model, vae, size, 1, 2, uncond, seed=1)  # warm-up: kernels, allocator
                for batch in a.stability_batches:
                    for rep in range(self.reps(batch)):
                        run, latents = self._run(ref, model, vae, size, batch, a.steps, uncond, seed=100 * rep)
                        vae_ms = run.step_ms[-1] if len(run.step_ms) > a.steps else None
                        self.results.add(
                            "engine",
                            row(
                                SYSTEM,
                                MODE,
                                self.model,
                                size,
                                batch,
                                a.steps,
                                run,
                                rep=rep,
                                vae_decode_ms=None if vae_ms is None else round(vae_ms, 1),
                                text_tokens=sr.TEXT_TOKENS,
                                batched_through_sampler=batch > 1,
                            ),
                        )
                        finite[f"{size}_b{batch}"] = bool(torch.isfinite(latents).all())
            self.results.note(
                "stability_ref",
                dict(
                    source=f"github Stability-AI/sd3.5 at {ref.commit} (.vendor/sd3.5, not committed)",
                    model=f"MMDiTX depth {shape.depth}, patch {shape.patch_size}, {shape.in_channels} channels, "
                    f"adm {shape.adm_in_channels}, context Linear {shape.context_in}->{64 * shape.depth}, "
                    f"random weights, {str(dtype).removeprefix('torch.')}",
                    sampler="sd3_impls.sample_euler (fp16 autocast) over CFGDenoiser, shift 3.0, the driver's sigmas",
                    text_tokens=f"{sr.TEXT_TOKENS} (77 CLIP + 77 T5; diffusers: 77 + 256 = 333)",
                    timed=f"noise, {a.steps} sampler steps, latent format, SDVAE.decode, PIL",
                    excluded="text encoders (random conditioning: its tokenizers need the hub); the driver's "
                    "model moves host<->GPU around each image (driver_model_moves_seconds)",
                    driver_model_moves_seconds=moves,
                    latents_finite=finite,
                    peak_memory="the diffusers pipeline waits on the host: peak counts the reference alone",
                ),
            )
        finally:
            del model, vae
            gc.collect()
            self.pipe.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _run(
        self, ref: sr.Reference, model, vae, size: int, batch: int, steps: int, uncond: sr.Conditioning, seed: int
    ) -> tuple[Run, torch.Tensor]:
        cond = sr.random_conditioning(sr.SHAPES[self.model], batch, self.device, uncond.y.dtype, seed=seed + 1)
        uncond_rows = sr.Conditioning(uncond.c_crossattn.expand(batch, -1, -1), uncond.y.expand(batch, -1))
        clock = StepClock(self.device)
        out = {}

        def go():
            out["latents"], _ = sr.generate(
                ref, model, vae, [seed + i for i in range(batch)], size, steps, GUIDANCE, cond, uncond_rows, mark=clock.mark
            )

        run = timed(self.device, go, clock)
        return run, out["latents"]

    def _driver_moves_seconds(self, model) -> dict[str, float] | None:
        """What the driver adds per image: the MMDiT to the host after sampling and back before."""
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        t0 = time.perf_counter()
        model.cpu()
        t1 = time.perf_counter()
        model.to(self.device)
        synchronize(self.device)
        t2 = time.perf_counter()
        return dict(to_host=round(t1 - t0, 2), to_gpu=round(t2 - t1, 2))
