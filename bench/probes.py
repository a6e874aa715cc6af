"""Device probes for bench/engine_bench.py: SDPA backends, host synchronisations per step, the first step."""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.measure import event_time_ms, relative_error, timed
from bench.runs import requests


def sdpa_probe(device, sizes) -> dict:
    """Milliseconds of one SDPA call per backend on the joint-attention shapes (32 rows = batch 16)."""
    from torch.nn.attention import sdpa_kernel

    from engine.speed import sdpa_priority

    out: dict[str, Any] = {}
    for rows, heads, size in [(32, 24, 1024), (2, 24, 1024), (32, 24, 512), (2, 38, 1024)]:
        if size not in sizes:
            continue
        tokens = (size // 16) ** 2 + 333
        q, k, v = (torch.randn(rows, heads, tokens, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
        ref = None
        key = f"rows{rows}_heads{heads}_tokens{tokens}"
        out[key] = {}
        for name in ("flash", "cudnn", "efficient"):
            try:
                with sdpa_kernel(sdpa_priority((name,))):
                    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
                    ms = event_time_ms(device, sdpa, repeats=5)
                    res = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                ref = res if ref is None else ref
                out[key][name] = dict(
                    ms=round(ms, 3),
                    tflops=round(4 * rows * heads * tokens * tokens * 64 / ms / 1e9, 1),
                    rel_err_vs_flash=round(relative_error(res, ref), 5),
                )
            except RuntimeError as exc:
                out[key][name] = f"unavailable: {str(exc)[:120]}"
        del q, k, v
    return out


def count_host_syncs(engine, device, size: int) -> dict:
    """Synchronising calls (`torch.cuda.set_sync_debug_mode`) in steady steps: after admission,
    before any request finishes."""
    if device.type != "cuda":
        return {}
    counts: dict[str, Any] = {}
    for label, k, policy in (("exact", 1, None), ("attention_k3", 3, "attention")):
        for r in requests(f"sync{label}", 2, size, 8, k=k, policy=policy):
            engine.add(r)
        engine.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(4):
                    engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
        counts[label] = len(syncs) / 4
        counts[f"{label}_examples"] = sorted(set(m[:160] for m in syncs))[:3]
        while engine.has_work():
            engine.step()
    return counts


def first_step_probe(engine, device, size: int, batch: int) -> dict:
    """Where the first step of `batch` requests arriving together goes: prompt encoding (each
    text encoder's forward as the engine has it, tokenisation on the host) and the step, with the
    profiler's top ops. Milliseconds, synchronised."""
    pipe = engine.pipe
    out: dict = {}

    def wall_ms(fn) -> float:
        return round(timed(device, fn).seconds * 1000, 1)

    def encode_ms(texts: list[str], tag: str) -> list[float]:
        return [wall_ms(lambda: engine.runner.prompts.encode([(t + tag + str(rep), "") for t in texts])) for rep in range(3)]

    texts = [r.prompt for r in requests("probe-enc", batch, size, 2)]
    encoders = (
        ("clip_l", pipe.tokenizer, 77, pipe.text_encoder),
        ("clip_g", pipe.tokenizer_2, 77, pipe.text_encoder_2),
        ("t5", pipe.tokenizer_3, engine.max_sequence_length, pipe.text_encoder_3),
    )
    with torch.inference_mode():
        out["encode_prompt_ms"] = encode_ms(texts, "")
        out["encode_prompt_b1_ms"] = encode_ms(texts[:1], "a")
        start = time.perf_counter()
        ids = {
            name: tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)
            for name, tok, length, _ in encoders
        }
        out["tokenize_ms"] = round((time.perf_counter() - start) * 1000, 1)
        for name, _, _, encoder in encoders:
            kwargs = {} if name == "t5" else dict(output_hidden_states=True)
            out[f"{name}_forward_ms"] = round(event_time_ms(device, lambda: encoder(ids[name], **kwargs), repeats=3), 1)
            out[f"{name}_forward_wall_ms"] = wall_ms(lambda: encoder(ids[name], **kwargs))
    for r in requests("probe-first", batch, size, 3):
        engine.add(r)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out["first_step_ms"] = wall_ms(engine.step)
    out["second_step_ms"] = wall_ms(engine.step)
    while engine.has_work():
        engine.step()
    averages = prof.key_averages()
    out["top_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    out["top_cuda"] = averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    return out
