"""FP8's quality on the reference model (`python -m bench.quality --precision fp8`, on the GPU):
the same held-out prompts and seeds through a bf16 engine and an FP8 engine (both the serving
fast path, exact steps); judge accuracy of each, PSNR and SSIM of FP8 against bf16. The FP8
engine runs FP8 attention as well (`--attention-precision fp8`, the default: fa3-fwd, Hopper), as
`--precision fp8` does on Hopper; `--attention-precision bf16` measures the FP8 linears alone.

Writes quality_fp8.json (quality_fp8_linears.json) under --out; with --engine-json, also notes the
numbers in the engine benchmark's file (`fp8_reference_quality`, `fp8_linears_reference_quality`),
whose summary then shows `fp8_reference_psnr_db` and `fp8_reference_accuracy_drop` (judge
accuracy points lost), or their `fp8_linears_` twins.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.image_metrics import psnr, ssim
from bench.results_file import note_in_engine_file
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_pipeline, resolve_device
from engine.fp8_attention import require_attention_precision
from engine.precision import PrecisionUnavailable, require_precision
from models.reference.evaluate import judge_images

PSNR_CAP = 100.0


def _images(config: EngineConfig, requests) -> tuple[list[np.ndarray], float, dict]:
    engine = Engine(config, load_pipeline(config))
    engine.generate(requests[:2])  # compile and capture before timing
    start = time.perf_counter()
    out = engine.generate(requests)
    seconds = time.perf_counter() - start
    images = [np.asarray(out[r.request_id].convert("RGB")) for r in requests]
    applied = dict(engine.speed_applied)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return images, seconds, applied


def result_name(attention_precision: str) -> str:
    """`fp8` (FP8 linears and FP8 attention, as `--precision fp8` runs on Hopper), or `fp8_linears`
    with bf16 attention: the prefix of the result's file and keys."""
    return "fp8_linears" if attention_precision == "bf16" else "fp8"


def fp8_quality(args, argv, prompts, requests) -> int:
    try:
        device = resolve_device(args.device)
        require_precision("fp8", device)
        require_attention_precision(args.attention_precision, device)
    except (PrecisionUnavailable, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    base = EngineConfig(model=args.model, device=args.device, dtype="bfloat16", max_batch=args.batch, compile=args.compile)
    captions = [p.prompt for p in prompts]
    bf16, bf16_seconds, _ = _images(base, requests)
    fp8, fp8_seconds, applied = _images(replace(base, precision="fp8", attention_precision=args.attention_precision), requests)
    bf16_accuracy, fp8_accuracy = judge_images(bf16, captions), judge_images(fp8, captions)
    name = result_name(args.attention_precision)
    result = dict(
        model=Path(args.model).name,
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        prompts=len(prompts),
        seeds="the held-out prompts' own",
        fp8_linears=applied.get("fp8_linears"),
        attention_precision=args.attention_precision,
        compile=args.compile,
        bf16_judge_accuracy=bf16_accuracy,
        fp8_judge_accuracy=fp8_accuracy,
        **{
            f"{name}_reference_accuracy_drop": round(100 * (bf16_accuracy - fp8_accuracy), 2),
            f"{name}_reference_psnr_db": round(float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(fp8, bf16)])), 2),
            f"{name}_reference_ssim": round(float(np.mean([ssim(a, b) for a, b in zip(fp8, bf16)])), 4),
        },
        bf16_seconds=round(bf16_seconds, 2),
        fp8_seconds=round(fp8_seconds, 2),
        command="python -m bench.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quality_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.engine_json:
        note_in_engine_results(Path(args.engine_json), result, name)
    print(json.dumps(result, indent=2))
    return 0


def note_in_engine_results(path: Path, result: dict, name: str = "fp8") -> None:
    note_in_engine_file(path, f"{name}_reference_quality", result)
