"""Merge the engine result files that several device calls returned into the committed one.

Each call starts from the committed file (bench/device_setup.sh copies it into $OUT), so a call's
file holds the committed rows plus its own. This keeps, from each call in order, the rows and
notes its last run wrote (the parts, sizes and batches in its `runs` entry, by bench/merge_rows.py's
rule) and appends that run to `runs`. Per-shape warm-up notes are merged key by key.

    python -m bench.merge_calls bench/results/engine_h200.json /work/.device/{1,2,3}/engine_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from bench import merge_rows
from bench.results_file import write_json
from bench.summary import engine_summary

# notes a part writes (key -> part); `warmup_seconds_per_shape` inside them merges by shape
PART_NOTES = {
    "diffusers_compiled": "diffusers-compiled",
    "xdit": "xdit",
    "stability_ref": "stability-ref",
    "fast_warmup_seconds": "e2e",
    "fp8": "e2e",
    "fp8_linears": "e2e",
    "accuracy": "accuracy",  # its keys over the older ones, one by one
}
MODEL, LARGE = "sd3-medium", "sd3.5-large"


def merge_call(base: dict, call: dict) -> dict:
    """`base` with `call`'s last run in place of the rows that run made again."""
    run = call["runs"][-1]
    if run in base.get("runs", []):
        raise SystemExit(f"the run started {run['started']} is already merged")
    config = run["config"]
    args = SimpleNamespace(  # runs before 2026-12-02 08:00 recorded `batches` alone
        parts=tuple(run["parts"]),
        sizes=config["sizes"],
        batches=config["batches"],
        eager_batches=config.get("eager_batches"),
        stability_batches=config.get("stability_batches"),
        large_batches=config.get("large_batches"),
        fp8=any(str(r.get("mode", "")).endswith("-fp8-linears") for r in call["rows"]),
        fp8_attention=any(str(r.get("mode", "")).endswith("-fp8") for r in call["rows"]),
    )
    kept = [r for r in base["rows"] if merge_rows.keep_row(args, MODEL, LARGE, "engine", r)]
    made = [r for r in call["rows"] if not merge_rows.keep_row(args, MODEL, LARGE, "engine", r)]
    out = dict(base, rows=kept + made, runs=base.get("runs", []) + [run])
    for key, part in PART_NOTES.items():
        if part in run["parts"] and key in call:
            out[key] = _merge_note(base.get(key), call[key])
    out["summary"] = engine_summary(out)
    return out


def _merge_note(old, new):
    """`new` over `old`; their per-shape warm-ups (and the total compile time) over both."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    merged = dict(old, **new)
    shapes = dict(old.get("warmup_seconds_per_shape") or {}, **(new.get("warmup_seconds_per_shape") or {}))
    if shapes:
        merged["warmup_seconds_per_shape"] = shapes
        if "compile_seconds_total" in merged:
            merged["compile_seconds_total"] = round(sum(shapes.values()), 1)
    return merged


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path, help="the committed engine_<card>.json (rewritten)")
    p.add_argument("calls", type=Path, nargs="+", help="the calls' engine_<card>.json, in the order they ran")
    a = p.parse_args(argv)
    data = json.loads(a.base.read_text())
    for path in a.calls:
        if not path.is_file():
            p.error(f"{path}: no such file (copy the device call's files here first)")
        data = merge_call(data, json.loads(path.read_text()))
        run = data["runs"][-1]
        print(f"{path}: run {run['started']} parts {','.join(run['parts'])} sizes {run['config']['sizes']}")
    write_json(a.base, data)


if __name__ == "__main__":
    main()
