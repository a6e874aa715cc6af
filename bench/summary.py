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
    # issue 17, H200: against the best of diffusers eager and diffusers-compiled
    "exact_vs_diffusers_best_1024": 1.0,
    "exact_vs_diffusers_best_512": 1.0,
    "b1_latency_vs_diffusers_best_1024": 1.0,
    "b1_latency_vs_diffusers_best_512": 1.0,
    "fp8_vs_diffusers_best_1024": 1.4,
    "fp8_b1_latency_vs_diffusers_best_1024": 1.25,
    "fp8_cached_vs_diffusers_best_1024": 2.0,
    # issue 21, H200: the seed paper's other baselines, each at its best batch
    "exact_vs_xdit_1024": 1.0,
    "exact_vs_stability_1024": 1.0,
}
# FP8 on the reference model: PSNR vs bf16 at least, and judge accuracy drop (points) at most
FP8_QUALITY_TARGETS = {"fp8_reference_psnr_db": 30.0}
FP8_MAX_ACCURACY_DROP = 1.0
# sd3serve modes and their names in the summary
ENGINE_MODES = (
    ("exact-fast", "exact"),
    ("exact-eager", "exact_eager"),
    ("attention-k3-fast", "cached_k3"),
    # FP8 as `--precision fp8` runs on a Hopper GPU with fa3-fwd: FP8 linears and FP8 attention
    ("exact-fp8", "fp8"),
    ("attention-k3-fp8", "fp8_cached"),
    # FP8 linears with bf16 attention (`--attention-precision bf16`)
    ("exact-fp8-linears", "fp8_linears"),
    ("attention-k3-fp8-linears", "fp8_linears_cached"),
)
LATENCY_MODES = (
    ("exact-fast", "b1_latency"),
    ("exact-fp8", "fp8_b1_latency"),
    ("exact-fp8-linears", "fp8_linears_b1_latency"),
)
# probe variants of the engine's FP8 blocks, as they are now first: FP8 attention too, linears alone
FP8_BLOCK_VARIANTS = ("fp8attnsg-dynamic-mk", "fp8attn-dynamic-mk")
LINEARS_BLOCK_VARIANTS = ("fp8sg-dynamic-mk", "fp8-dynamic-mk", "fp8-dynamic", "fp8-dynamic-untuned")
DIFFUSERS_SYSTEMS = (("diffusers", "eager"), ("diffusers-compiled", "compiled"))
# other systems of the seed paper's Figure 3: name in the summary -> their systems (any mode)
OTHER_BASELINES = {"xdit": ("xdit", "xdit-compile"), "stability": ("stability-ref",)}


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
            out.update(_vs_diffusers(ips, latency, model, size, suffix))
    for size in sorted({r["size"] for r in rows}):
        out.update(_vs_other_baselines(ips, size))
    out.update(_fp8_reference(data))
    out.update(_fp8_blocks(data))
    mfu = _mfu(data, step_ms, ips)
    if mfu:
        out["mfu_exact_1024"] = mfu
    out["targets"] = {
        name: dict(target=target, value=out.get(name), met=out.get(name) is not None and out[name] >= target)
        for name, target in {**TARGETS, **FP8_QUALITY_TARGETS}.items()
    }
    drop = out.get("fp8_reference_accuracy_drop")
    out["targets"]["fp8_reference_accuracy_drop"] = dict(
        target=f"<= {FP8_MAX_ACCURACY_DROP}", value=drop, met=drop is not None and drop <= FP8_MAX_ACCURACY_DROP
    )
    return out


def _vs_diffusers(ips: dict, latency: dict, model: str, size: int, suffix: str) -> dict:
    """Each engine mode's best images/s and batch-1 latency over diffusers eager (`_vs_diffusers`)
    and over the best diffusers row, eager or compiled, at that size and batch (`_vs_diffusers_best`)."""
    out: dict = {}
    bests = {
        label: _best(ips, system, mode, model, size) for (system, mode), label in zip(DIFFUSERS_SYSTEMS, ("eager", "compiled"))
    }
    found = [b for b in bests.values() if b]
    if not found:
        return out
    eager, best = bests["eager"], max(found)
    best_label = "compiled" if bests["compiled"] == best else "eager"
    if eager:
        out[f"diffusers_best_images_per_s{suffix}_{size}"] = dict(value=eager[0], batch=eager[1])
    out[f"diffusers_best_any_images_per_s{suffix}_{size}"] = dict(value=best[0], batch=best[1], system=best_label)
    b1 = [
        latency[(system, mode, model, size, 1)]
        for system, mode in DIFFUSERS_SYSTEMS
        if latency.get((system, mode, model, size, 1))
    ]
    d1 = latency.get(("diffusers", "eager", model, size, 1))
    for mode, name in ENGINE_MODES:
        ours = _best(ips, "sd3serve", mode, model, size)
        if ours:
            if eager:
                out[f"{name}_vs_diffusers{suffix}_{size}"] = round(ours[0] / eager[0], 3)
            out[f"{name}_vs_diffusers_best{suffix}_{size}"] = round(ours[0] / best[0], 3)
            out[f"{name}_best_batch{suffix}_{size}"] = ours[1]
    for mode, name in LATENCY_MODES:
        f1 = latency.get(("sd3serve", mode, model, size, 1))
        if f1 and d1:
            out[f"{name}_vs_diffusers{suffix}_{size}"] = round(d1 / f1, 3)
        if f1 and b1:
            out[f"{name}_vs_diffusers_best{suffix}_{size}"] = round(min(b1) / f1, 3)
    return out


def _vs_other_baselines(ips: dict, size: int) -> dict:
    """sd3serve exact (and cached K=3) best images/s over the best row of xDiT (eager or compiled)
    and of Stability's reference sampler, SD3-medium at `size`."""
    out: dict = {}
    for name, systems in OTHER_BASELINES.items():
        found = [(v, key[4], key[0]) for key, v in ips.items() if key[0] in systems and key[2:4] == (MEDIUM, size)]
        if not found:
            continue
        theirs = max(found)
        out[f"{name}_best_images_per_s_{size}"] = dict(value=theirs[0], batch=theirs[1], system=theirs[2])
        for mode, label in (("exact-fast", "exact"), ("attention-k3-fast", "cached_k3")):
            ours = _best(ips, "sd3serve", mode, MEDIUM, size)
            if ours:
                out[f"{label}_vs_{name}_{size}"] = round(ours[0] / theirs[0], 3)
    return out


def _fp8_reference(data: dict) -> dict:
    """FP8's quality on the reference model, with FP8 attention (`fp8_`) and with bf16 attention
    (`fp8_linears_`; bench/precision_quality.py notes them in the file)."""
    out = {}
    for name in ("fp8", "fp8_linears"):
        ref = data.get(f"{name}_reference_quality") or {}
        keys = (f"{name}_reference_psnr_db", f"{name}_reference_ssim", f"{name}_reference_accuracy_drop")
        out.update({k: ref[k] for k in keys if k in ref})
    return out


def _fp8_blocks(data: dict) -> dict:
    """bench/fp8_compile_probe.py's two-block forward at 1024² (noted as `fp8_block_probe`):
    bf16 ms over FP8 ms (the engine's FP8 blocks, multi-kernel since call e12 and with the
    sigmoid-form GELU since e14: with FP8 attention, and with FP8 linears alone), and the first
    call's compile seconds of each."""
    variants = {v["variant"]: v for v in data.get("fp8_block_probe", {}).get("variants", []) if "forward_ms" in v}
    bf16 = variants.get("bf16-dynamic")
    linears, fp8 = (
        next((variants[v] for v in names if v in variants), None) for names in (LINEARS_BLOCK_VARIANTS, FP8_BLOCK_VARIANTS)
    )
    if not (bf16 and linears):
        return {}
    out = dict(
        fp8_linears_block_forward_speedup_1024=round(bf16["forward_ms"] / linears["forward_ms"], 3),
        fp8_block_compile_s={name: v["first_call_s"] for name, v in variants.items()},
    )
    if fp8:
        out["fp8_block_forward_speedup_1024"] = round(bf16["forward_ms"] / fp8["forward_ms"], 3)
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
    named = [r for r in rows if "setting" in r and r["mode"] != "exact"]  # --caching-settings rows
    cached = [r for r in rows if r["mode"] != "exact" and "setting" not in r]
    settings = {f"{r['setting']}@{r['size']}_b{r['batch']}": r["speedup_vs_exact"] for r in named}
    if not cached:
        return {"settings_speedup": settings} if settings else {}
    out: dict = {"settings_speedup": settings} if settings else {}
    out |= {
        "fraction_of_ideal_min": min(r["fraction_of_ideal"] for r in cached),
        "fraction_of_ideal_mean": round(statistics.mean(r["fraction_of_ideal"] for r in cached), 3),
        "fraction_of_ideal_at_fresh_ratio_mean": round(statistics.mean(r["fraction_of_ideal_at_fresh_ratio"] for r in cached), 3),
        "rows_at_least_85pct_of_ideal": f"{sum(r['fraction_of_ideal'] >= 0.85 for r in cached)}/{len(cached)}",
        "a_non_attention_share": {f"{r['size']}_b{r['batch']}": r["a"] for r in cached if r["mode"] == "attention"},
    }
    for mode, k in sorted({(r["mode"], r["K"]) for r in cached}):
        sel = [r for r in cached if (r["mode"], r["K"]) == (mode, k)]
        out[f"{mode}_k{k}_speedup"] = {f"{r['size']}_b{r['batch']}": r["speedup_vs_exact"] for r in sel}
    return out
