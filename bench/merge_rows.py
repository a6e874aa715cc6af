"""Which rows of the result files a `--merge` run of bench/engine_bench.py keeps: all but those
it makes again (its parts, at its sizes and batches)."""

from __future__ import annotations

from typing import Any

# systems measured by a part of their own (every other system's rows come from `e2e` or `large`)
PART_OF_SYSTEM = {
    "diffusers-compiled": "diffusers-compiled",
    "xdit": "xdit",
    "xdit-compile": "xdit",
    "stability-ref": "stability-ref",
}


def keep_row(args: Any, model: str, large: str, which: str, row: dict) -> bool:
    parts = args.parts
    if row.get("size") not in args.sizes:
        return True
    if which == "caching":
        return "caching" not in parts
    if "batch" in row and row["batch"] not in batches_made(args, large, row):
        return True
    system = row.get("system")
    if system in PART_OF_SYSTEM:
        return PART_OF_SYSTEM[system] not in parts
    mode = str(row.get("mode", ""))
    if mode.endswith("-fp8-linears"):
        return not ("e2e" in parts and args.fp8)
    if mode.endswith("-fp8"):  # FP8 linears and FP8 attention
        return not ("e2e" in parts and getattr(args, "fp8_attention", False))
    return not (("e2e" in parts and row.get("model") == model) or ("large" in parts and row.get("model") == large))


def batches_made(args: Any, large: str, row: dict) -> list[int]:
    """The batches at which a run makes rows like `row` (each part has its own batch list)."""
    if row.get("system") == "stability-ref":
        return list(getattr(args, "stability_batches", None) or args.batches)
    if row.get("model") == large:
        return list(getattr(args, "large_batches", None) or args.batches)
    if row.get("mode") == "exact-eager":
        return list(getattr(args, "eager_batches", None) or args.batches)
    return list(args.batches)
