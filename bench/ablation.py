"""What each piece of the speed work buys: one transformer forward per variant (each on its own
copy of the pipeline's transformer, so the pipeline stays untouched for the diffusers baseline),
kernel-time profiles of the eager and the fast forward, and VAE decode variants."""

from __future__ import annotations

import copy
import gc
import time
from types import SimpleNamespace
from typing import Any

import torch

from bench.measure import event_time_ms, relative_error, synchronize
from bench.shapes import forward_inputs
from engine.speed import FAST_SDPA, SpeedOptions, apply_speed

# (size, rows): one request (2 CFG rows) and 8 requests at 1024², 16 requests at 512²
SHAPES = ((1024, 2), (1024, 16), (512, 32))


def variants(fast: SpeedOptions) -> list[tuple[str, SpeedOptions]]:
    backend: dict[str, Any] = dict(backend=fast.backend, mode=fast.mode)
    return [
        ("eager", SpeedOptions()),
        ("eager+cudnn_sdpa", SpeedOptions(sdpa=FAST_SDPA)),
        ("compile", SpeedOptions(compile=True, **backend)),
        ("compile+cudnn_sdpa+fused_qkv", SpeedOptions(compile=True, sdpa=FAST_SDPA, fuse_qkv=True, **backend)),
        (
            "compile+cudnn_sdpa+fused_qkv+gelu_epilogue",
            SpeedOptions(compile=True, sdpa=FAST_SDPA, fuse_qkv=True, gelu_epilogue=True, **backend),
        ),
        (
            "compile+cudnn_sdpa+fused_qkv+gelu_epilogue+split_queries",
            SpeedOptions(compile=True, sdpa=FAST_SDPA, fuse_qkv=True, gelu_epilogue=True, split_queries=True, **backend),
        ),
    ]


def ablation(pipe, device, dtype, args, fast: SpeedOptions) -> dict:
    shapes = [(s, r) for s, r in SHAPES if s in args.sizes] or [(args.sizes[0], 2)]
    if device.type == "cpu":
        shapes = [(args.sizes[0], 2)]
    out: dict = {
        "shapes": [f"{s}x{s}_rows{r}" for s, r in shapes],
        "forward_ms": {},
        "first_call_seconds": {},
        "rel_err_vs_eager": {},
        "profiles": {},
    }
    reference = None
    chosen = [v for v in variants(fast) if not args.ablation_variants or v[0] in args.ablation_variants]
    out["applied"] = {}
    for name, options in chosen:
        model = copy.deepcopy(pipe.transformer)
        out["applied"][name] = apply_speed(SimpleNamespace(transformer=model, vae=None), options)
        times, first = {}, {}
        for size, rows in shapes:
            inputs = forward_inputs(model, size, device, dtype, rows)

            def forward(inputs=inputs):
                with torch.inference_mode():
                    return model(**inputs, return_dict=False)[0]

            start = time.perf_counter()
            result = forward()
            synchronize(device)
            first[f"{size}_rows{rows}"] = round(time.perf_counter() - start, 2)
            times[f"{size}_rows{rows}"] = round(event_time_ms(device, forward, repeats=5), 2)
            if (size, rows) == shapes[0]:
                result = result.float().cpu()
                reference = result if reference is None else reference
                out["rel_err_vs_eager"][name] = round(relative_error(result, reference), 5)
        out["forward_ms"][name] = times
        out["first_call_seconds"][name] = first
        if (name == "eager" or name.startswith("compile+cudnn_sdpa+fused_qkv+gelu_epilogue")) and device.type == "cuda":
            size, rows = shapes[min(1, len(shapes) - 1)]
            inputs = forward_inputs(model, size, device, dtype, rows)
            out["profiles"][f"{name}_{size}_rows{rows}"] = kernel_profile(lambda: model(**inputs, return_dict=False), device)
        model = None  # freed before the next variant (a `del` would unbind it for the closures above)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    vae_size = args.vae_size or max(s for s, _ in shapes)
    compiled = tuple(v for v in args.vae_compiles.split(",") if v) if fast.vae_compile else ()
    out["vae_decode_ms"] = vae_variants(pipe.vae, device, dtype, vae_size, fast, compiled)
    return out


def kernel_profile(fn, device, top: int = 15) -> dict:
    """Device time per kernel class and the top kernels of one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
    kernels = []
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0) or 0)
        if us > 0:
            kernels.append((event.key, us / 1000, event.count))
    total = sum(ms for _, ms, _ in kernels) or 1.0
    classes: dict[str, float] = {}
    for name, ms, _ in kernels:
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    return dict(
        total_ms=round(total, 2),
        by_class_ms={k: round(v, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        top=[
            dict(kernel=name[:90], ms=round(ms, 2), calls=n, share=round(ms / total, 3))
            for name, ms, n in sorted(kernels, key=lambda k: -k[1])[:top]
        ],
    )


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul")):
        return "gemm"
    if low.startswith("triton"):
        return "triton (fused elementwise)"
    if "memcpy" in low or "copy" in low or "cat" in low:
        return "copies"
    return "other elementwise / reductions"


def vae_variants(vae, device, dtype, size: int, fast: SpeedOptions, compiled: tuple[str, ...] = ()) -> dict:
    """Milliseconds per image of one decode at `size`², batch 1 and 4, for layouts and kernels;
    then each of `compiled` (`VAE_COMPILES` names, `+group_norm` for our GroupNorm kernel) at
    batch 4, with its compile time, profile and difference to the eager decode."""
    out: dict[str, Any] = {}
    model = copy.deepcopy(vae)
    for batch in (1, 4):
        latents = torch.randn(batch, 16, size // 8, size // 8, device=device, dtype=dtype)
        with torch.inference_mode():
            out[f"eager_b{batch}"] = round(event_time_ms(device, lambda: model.decode(latents), repeats=3) / batch, 2)
            if device.type == "cuda":
                with torch.backends.cudnn.flags(enabled=True, benchmark=True):
                    ms = event_time_ms(device, lambda: model.decode(latents), repeats=3, warmup=2)
                out[f"cudnn_benchmark_b{batch}"] = round(ms / batch, 2)
                model.to(memory_format=torch.channels_last)
                ms = event_time_ms(device, lambda: model.decode(latents), repeats=3)
                out[f"channels_last_b{batch}"] = round(ms / batch, 2)
                model.to(memory_format=torch.contiguous_format)
                if batch == 4:
                    out["profile_b4"] = kernel_profile(lambda: model.decode(latents), device, top=12)
    model = None  # freed before the compiled variants
    if device.type != "cuda":
        return out
    latents = torch.randn(4, 16, size // 8, size // 8, device=device, dtype=dtype)
    with torch.inference_mode():
        reference = vae.decode(latents, return_dict=False)[0].float() if compiled else None
    for how in compiled:  # each compile takes a minute or more: only those asked for
        model = copy.deepcopy(vae)
        layout, _, extra = how.partition("+")  # e.g. "whole+group_norm": with our GroupNorm kernel
        apply_speed(
            SimpleNamespace(transformer=torch.nn.Identity(), vae=model),
            SpeedOptions(
                vae_compile=True,
                vae_compile_how=layout,
                vae_group_norm=extra == "group_norm",
                backend=fast.backend,
                mode=fast.mode,
            ),
        )
        with torch.inference_mode():
            start = time.perf_counter()
            model.decode(latents)
            synchronize(device)
            out[f"compiled_{how}_first_call_seconds_b4"] = round(time.perf_counter() - start, 1)
            out[f"compiled_{how}_b4"] = round(event_time_ms(device, lambda: model.decode(latents), repeats=3) / 4, 2)
            out[f"compiled_{how}_profile_b4"] = kernel_profile(lambda: model.decode(latents), device, top=12)
            decoded = model.decode(latents, return_dict=False)[0].float()
            assert reference is not None  # decoded above when anything is compiled
            out[f"compiled_{how}_rel_err_vs_eager"] = round(relative_error(decoded, reference), 5)
        model = None  # freed before the next variant (a `del` would unbind it for the closures above)
        gc.collect()
        torch.cuda.empty_cache()
    return out
