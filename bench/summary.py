"""Summary ratios of the benchmark JSON (recomputed from the rows every time the file is saved)."""
from __future__ import annotations

import statistics
from collections import defaultdict

MEDIUM, LARGE = "sd3-medium", "sd3.5-large"
TARGETS = {  # issue 6, H100
    "exact_vs_diffusers_1024": 1.35,
    "exact_vs_diffusers_512": 1.5,
    "b1_latency_vs_diffusers_1024": 1.3,
    "cached_k3_vs_diffusers_1024": 2.0,
}


def _per_config(rows: list[dict], field: str) -> dict[tuple, float]:
    """Median of `field` over repetitions of each (system, mode, model, size, batch)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(field) is not None:
            groups[(r["system"], r["mode"], r["model"], r["size"], r["batch"])].append(r[field])
    return {key: statistics.median(values) for key, values in groups.items()}


def _best(ips: dict, system: str, mode: str, model: str, size: int) -> tuple[float, int] | None:
    found = [(v, key[4]) for key, v in ips.items() if key[:4] == (system, mode, model, size)]
    return max(found) if found else None


def engine_summary(data: dict) -> dict:
    rows = data.get("rows", [])
    ips = _per_config(rows, "images_per_s")
    latency = _per_config(rows, "seconds_per_image_latency")
    step_ms = _per_config(rows, "ms_per_step")
    out: dict = {}
    for model, suffix in ((MEDIUM, ""), (LARGE, "_large")):
        for size in sorted({r["size"] for r in rows}):
            base = _best(ips, "diffusers", "eager", model, size)
            if not base:
                continue
            out[f"diffusers_best_images_per_s{suffix}_{size}"] = dict(value=base[0], batch=base[1])
            for mode, name in (("exact-fast", "exact"), ("exact-eager", "exact_eager"), ("attention-k3-fast", "cached_k3")):
                best = _best(ips, "sd3serve", mode, model, size)
                if best:
                    out[f"{name}_vs_diffusers{suffix}_{size}"] = round(best[0] / base[0], 3)
                    out[f"{name}_best_batch{suffix}_{size}"] = best[1]
            d1 = latency.get(("diffusers", "eager", model, size, 1))
            f1 = latency.get(("sd3serve", "exact-fast", model, size, 1))
            if d1 and f1:
                out[f"b1_latency_vs_diffusers{suffix}_{size}"] = round(d1 / f1, 3)
    mfu = _mfu(data, step_ms, ips)
    if mfu:
        out["mfu_exact_1024"] = mfu
    out["targets"] = {
        name: dict(target=target, value=out.get(name), met=out.get(name) is not None and out[name] >= target)
        for name, target in TARGETS.items()
    }
    return out


def _mfu(data: dict, step_ms: dict, ips: dict) -> dict | None:
    """Transformer matmul FLOPs per second at the fast path's best 1024² batch, over the card's
    measured dense bf16 matmul rate."""
    peak = (data.get("probe") or {}).get("matmul_tflops_bf16")
    flops = (data.get("transformer_flops_per_row") or {}).get(f"{MEDIUM}_1024")
    best = _best(ips, "sd3serve", "exact-fast", MEDIUM, 1024)
    if not (peak and flops and best):
        return None
    ms = step_ms.get(("sd3serve", "exact-fast", MEDIUM, 1024, best[1]))
    if not ms:
        return None
    achieved = flops * 2 * best[1] / (ms / 1000) / 1e12  # two CFG rows per request
    return dict(value=round(achieved / peak, 3), achieved_tflops=round(achieved, 1), matmul_tflops=peak, batch=best[1])


def caching_summary(data: dict) -> dict:
    rows = data.get("rows", [])
    cached = [r for r in rows if r["mode"] != "exact"]
    if not cached:
        return {}
    out = {
        "fraction_of_ideal_min": min(r["fraction_of_ideal"] for r in cached),
        "fraction_of_ideal_mean": round(statistics.mean(r["fraction_of_ideal"] for r in cached), 3),
        "fraction_of_ideal_at_fresh_ratio_mean": round(
            statistics.mean(r["fraction_of_ideal_at_fresh_ratio"] for r in cached), 3
        ),
        "rows_at_least_85pct_of_ideal": f"{sum(r['fraction_of_ideal'] >= 0.85 for r in cached)}/{len(cached)}",
        "a_non_attention_share": {f"{r['size']}_b{r['batch']}": r["a"] for r in cached if r["mode"] == "attention"},
    }
    for mode, k in sorted({(r["mode"], r["K"]) for r in cached}):
        sel = [r for r in cached if (r["mode"], r["K"]) == (mode, k)]
        out[f"{mode}_k{k}_speedup"] = {f"{r['size']}_b{r['batch']}": r["speedup_vs_exact"] for r in sel}
    return out
