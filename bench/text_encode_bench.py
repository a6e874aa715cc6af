"""Prompt encoding of new jobs at SD3-medium shapes (random weights): CLIP-L, CLIP-G and T5-XXL with
their layers compiled (the worker's default before), then the same encoders replayed as CUDA
graphs (engine/text_graphs.py), in one process on one card. Each timing encodes texts the cache
has not seen (host clock, synchronised), as a job's first step does.

    python -m bench.text_encode_bench --out bench/results/text_encode_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.measure import card_name
from engine.config import EngineConfig
from engine.engine import DEFAULT_MAX_SEQUENCE_LENGTH
from engine.loader import PromptEncoder, load_pipeline
from engine.text_graphs import TextEncoderGraphs
from engine.text_speed import compile_text_encoders


def encode_ms(prompts: PromptEncoder, texts: int, reps: int, tag: str) -> list[float]:
    """Milliseconds to encode `texts` new texts, `reps` times."""
    out = []
    for rep in range(reps):
        pairs = [(f"{tag} {rep} {i}: a photo of a cat on a mat", "") for i in range(texts)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        prompts.encode(pairs)
        torch.cuda.synchronize()
        out.append(round((time.perf_counter() - start) * 1000, 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:sd3-medium")
    p.add_argument("--texts", default="1,2,4")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    counts = [int(x) for x in args.texts.split(",") if x]
    pipe = load_pipeline(EngineConfig(model=args.model, device="cuda", dtype="bfloat16"))
    compile_text_encoders(pipe)
    prompts = PromptEncoder(pipe, DEFAULT_MAX_SEQUENCE_LENGTH)
    result: dict = dict(card=card_name(torch.device("cuda")), model=args.model, torch=torch.__version__, rows={})
    rows = result["rows"]
    prompts.encode([("warm-up", "")])
    for texts in counts:  # compile at every count first (dynamic shapes: one or two compiles)
        encode_ms(prompts, texts, 2, "compile")
    for texts in counts:
        rows[f"compiled_layers_{texts}"] = encode_ms(prompts, texts, args.reps, "compiled")
    graphs = TextEncoderGraphs(max_texts=max(counts))
    result["encoders_graphed"] = graphs.install(pipe)
    start = time.perf_counter()
    for texts in counts:
        encode_ms(prompts, texts, 1, "capture")
    result["capture_seconds"] = round(time.perf_counter() - start, 2)
    for texts in counts:
        rows[f"graphs_{texts}"] = encode_ms(prompts, texts, args.reps, "graphs")
    result["graphs_failed"] = graphs.failed
    result["median_ms"] = {k: statistics.median(v) for k, v in rows.items()}
    for texts in counts:
        a, b = result["median_ms"][f"compiled_layers_{texts}"], result["median_ms"][f"graphs_{texts}"]
        result["median_ms"][f"speedup_{texts}"] = round(a / b, 2) if b else None
    print(json.dumps(result["median_ms"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
