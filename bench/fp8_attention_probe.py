"""FP8 attention on Hopper (issue 17): times each low-precision kernel of
bench/fp8_attention_kernels.py against torch SDPA at SD3-medium's joint-attention shapes and
reports its relative error. A candidate that cannot load here is listed as skipped, with why.

    python -m bench.fp8_attention_probe --out $OUT/fp8_attention_h200.json --rows 2,32
    python -m bench.fp8_attention_probe --device cpu --out /tmp/p.json --rows 1 --heads 2 --tokens 64

Default shape: 2 rows (one request, CFG) × 24 heads × 4429 tokens (4096 image + 333 text at
1024²) × 64. Errors are ‖out − ref‖/‖ref‖ against the fastest bf16 SDPA backend (`vs_sdpa`) and
against float32 attention (`vs_fp32`), on standard-normal inputs and on inputs with a few large
Q/K channels (`outliers`, sharper softmax; closer to what trained models produce).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.fp8_attention_kernels import CANDIDATES, PACKAGE_FACTS, Kernel, Unavailable, emulated_fp8_qkv
from bench.measure import card_name, event_time_ms, relative_error

log = logging.getLogger("bench.fp8_attention")

INPUT_KINDS = ("normal", "outliers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=_positive_list, default=[2], help="batch rows, comma-separated (2 = one request)")
    parser.add_argument("--heads", type=_positive, default=24)
    parser.add_argument("--tokens", type=_positive, default=4096 + 333)
    parser.add_argument("--head-dim", type=_positive, default=64)
    parser.add_argument("--repeats", type=_positive, default=30)
    parser.add_argument("--warmup", type=_positive, default=3)
    names = [c.name for c in CANDIDATES]
    parser.add_argument("--candidates", type=lambda s: _names(s, names), default=names, help=",".join(names))
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_list(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",")]


def _names(text: str, known: list[str]) -> list[str]:
    chosen = [part for part in text.split(",") if part]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown candidates {unknown}; known: {known}")
    return chosen


def attention_inputs(shape: tuple[int, int, int, int], kind: str, device: torch.device, seed: int):
    """q, k, v in SDPA's layout, bf16. `outliers` scales 1 in 16 head-dim channels of q and k by 6."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    if kind == "outliers":
        channels = torch.randperm(shape[-1], generator=gen)[: max(1, shape[-1] // 16)]
        q[..., channels] *= 6
        k[..., channels] *= 6
    return tuple(t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v))


def fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # both accumulate float32 in float32
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def sdpa_backends(device: torch.device) -> dict[str, SDPBackend]:
    if device.type == "cuda":
        names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    else:
        names = {"flash": "FLASH_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, member) for name, member in names.items()}


def _sdpa(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def load_candidates(device: torch.device, names: list[str]) -> tuple[dict[str, Kernel], dict[str, dict]]:
    kernels: dict[str, Kernel] = {}
    status: dict[str, dict] = {}
    for cand in CANDIDATES:
        if cand.name not in names:
            continue
        entry: dict[str, Any] = dict(package=cand.package, precision=cand.precision)
        try:
            kernels[cand.name] = cand.load(device)
            entry["status"] = "loaded"
        except Unavailable as exc:
            entry.update(status="skipped", reason=str(exc))
        status[cand.name] = entry
        log.info("%s: %s", cand.name, entry.get("reason", "loaded"))
    return kernels, status


def probe_shape(args, device: torch.device, rows: int, kernels: dict[str, Kernel], status: dict) -> dict:
    shape = (rows, args.heads, args.tokens, args.head_dim)
    flops = 4 * rows * args.heads * args.tokens * args.tokens * args.head_dim
    inputs = {kind: attention_inputs(shape, kind, device, seed=i) for i, kind in enumerate(INPUT_KINDS)}
    refs = {kind: fp32_attention(*qkv) for kind, qkv in inputs.items()}
    q, k, v = inputs["normal"]

    def timing(fn, *fn_args) -> dict:
        ms = event_time_ms(device, lambda: fn(*fn_args), repeats=args.repeats, warmup=args.warmup)
        return dict(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))

    sdpa: dict[str, Any] = {}
    for name, backend in sdpa_backends(device).items():
        try:
            out = _sdpa(backend)(q, k, v)
            sdpa[name] = dict(timing(_sdpa(backend), q, k, v), rel_err_vs_fp32=round(relative_error(out, refs["normal"]), 5))
        except RuntimeError as exc:
            sdpa[name] = dict(status="unavailable", reason=str(exc).splitlines()[0][:200])
    timed = {name: row for name, row in sdpa.items() if "ms" in row}
    if not timed:
        raise RuntimeError(f"no SDPA backend runs on {device} at {shape}: {sdpa}")
    baseline = min(timed, key=lambda name: timed[name]["ms"])
    base_ms = timed[baseline]["ms"]
    base_outs = {kind: _sdpa(sdpa_backends(device)[baseline])(*qkv) for kind, qkv in inputs.items()}

    rows_out: dict[str, Any] = {}
    for name, entry in status.items():
        if name not in kernels:
            rows_out[name] = dict(status="skipped", reason=entry["reason"])
            continue
        rows_out[name] = _probe_kernel(kernels[name], inputs, refs, base_outs, timing, base_ms)
        log.info("rows %d %s: %s", rows, name, rows_out[name])
    emulated = _probe_kernel(emulated_fp8_qkv(), inputs, refs, base_outs, None, base_ms)
    return dict(
        shape=list(shape),
        flops=flops,
        sdpa=sdpa,
        sdpa_baseline=baseline,
        candidates=rows_out,
        fp8_qkv_emulated=emulated,
    )


def _probe_kernel(kernel: Kernel, inputs: dict, refs: dict, base_outs: dict, timing, base_ms: float) -> dict:
    """Errors on every input kind, then (unless `timing` is None) the time with and without `prepare`."""
    row: dict[str, Any] = {}
    try:
        for kind, qkv in inputs.items():
            # clones: a kernel may change its inputs (SageAttention centres k in place)
            out = kernel(*(t.clone() for t in qkv))
            if out.shape != refs[kind].shape or not torch.isfinite(out).all():
                raise RuntimeError(f"bad output on {kind} inputs: shape {tuple(out.shape)}, dtype {out.dtype}")
            row[f"rel_err_vs_sdpa_{kind}"] = round(relative_error(out, base_outs[kind]), 5)
            row[f"rel_err_vs_fp32_{kind}"] = round(relative_error(out, refs[kind]), 5)
        if timing is None:
            return dict(row, status="ok")
        q, k, v = inputs["normal"]
        total = timing(kernel, q, k, v)
        prepared = kernel.prepare(q, k, v)
        only = timing(kernel.run, *prepared)
    except Exception as exc:  # a kernel that loads but fails at these shapes is a finding, not a crash
        return dict(row, status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return dict(
        row,
        status="ok",
        ms=total["ms"],
        tflops=total["tflops"],
        kernel_ms=only["ms"],
        kernel_tflops=only["tflops"],
        speedup_vs_sdpa=round(base_ms / total["ms"], 3),
        kernel_speedup_vs_sdpa=round(base_ms / only["ms"], 3),
    )


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = dict(device=str(device), card=card_name(device), torch=torch.__version__)
    if device.type == "cuda":
        env.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def summary_lines(result: dict) -> list[str]:
    lines = []
    for shape_row in result["shapes"]:
        base = shape_row["sdpa_baseline"]
        base_row = shape_row["sdpa"][base]
        lines.append(f"shape {shape_row['shape']}: sdpa[{base}] {base_row['ms']} ms ({base_row['tflops']} TFLOP/s)")
        for name, row in shape_row["candidates"].items():
            if row["status"] != "ok":
                lines.append(f"  {name:28s} {row['status']}: {row['reason']}")
                continue
            lines.append(
                f"  {name:28s} {row['ms']:8.4f} ms (kernel {row['kernel_ms']:.4f}) x{row['speedup_vs_sdpa']:.2f} "
                f"err vs sdpa {row['rel_err_vs_sdpa_normal']:.4f} / outliers {row['rel_err_vs_sdpa_outliers']:.4f}"
            )
        emulated = shape_row["fp8_qkv_emulated"]
        if emulated["status"] == "ok":
            lines.append(
                f"  {'(fp8 Q/K/V rounding alone)':28s} err vs sdpa {emulated['rel_err_vs_sdpa_normal']:.4f} "
                f"/ outliers {emulated['rel_err_vs_sdpa_outliers']:.4f}"
            )
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    torch.manual_seed(0)
    kernels, status = load_candidates(device, args.candidates)
    result: dict[str, Any] = dict(environment(device), candidates=status, package_facts=PACKAGE_FACTS, shapes=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for rows in args.rows:
            result["shapes"].append(probe_shape(args, device, rows, kernels, status))
            args.out.write_text(json.dumps(result, indent=1))  # a cut-off run keeps the shapes done
    args.out.write_text(json.dumps(result, indent=1))
    for line in summary_lines(result):
        print(line)
    return result


if __name__ == "__main__":
    main()
