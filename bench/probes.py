"""Device probes for bench/engine_bench.py: SDPA backends, host synchronisations per step."""
from __future__ import annotations

import warnings

import torch

from bench.measure import event_time_ms, relative_error
from bench.runs import requests


def sdpa_probe(device, sizes) -> dict:
    """Milliseconds of one SDPA call per backend on the joint-attention shapes (32 rows = batch 16)."""
    from torch.nn.attention import sdpa_kernel

    from engine.speed import sdpa_priority

    out = {}
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
                    ms = event_time_ms(device, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats=5)
                    res = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                ref = res if ref is None else ref
                out[key][name] = dict(ms=round(ms, 3), tflops=round(4 * rows * heads * tokens * tokens * 64 / ms / 1e9, 1),
                                      rel_err_vs_flash=round(relative_error(res, ref), 5))
            except RuntimeError as exc:
                out[key][name] = f"unavailable: {str(exc)[:120]}"
        del q, k, v
    return out


def count_host_syncs(engine, device, size: int) -> dict:
    """Synchronising calls (`torch.cuda.set_sync_debug_mode`) in steady steps: after admission,
    before any request finishes."""
    if device.type != "cuda":
        return {}
    counts = {}
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
