"""The GPU benchmark script runs end to end in its CPU smoke mode and writes the promised JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.entry_points import exit_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_engine_bench_smoke_writes_both_result_files(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bench.engine_bench",
        "--smoke",
        "--out-dir",
        str(tmp_path),
        "--parts",
        "e2e,diffusers-compiled,accuracy,caching,memory",
        "--batches",
        "1,2",
        "--caching-batches",
        "2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    engine = json.loads((tmp_path / "engine_cpu.json").read_text())
    caching = json.loads((tmp_path / "caching_cpu.json").read_text())

    assert {"card", "torch", "diffusers", "rows", "summary"} <= engine.keys()
    systems = {(r["system"], r["mode"]) for r in engine["rows"]}
    assert systems == {
        ("diffusers", "eager"),
        ("diffusers-compiled", "compiled"),
        ("sd3serve", "exact-eager"),
        ("sd3serve", "exact-fast"),
        ("sd3serve", "attention-k3-fast"),
    }
    compiled = [r for r in engine["rows"] if r["system"] == "diffusers-compiled"]
    # warmed up (and compiled) at every measured shape before timing, its time in the row
    assert {(r["size"], r["batch"]) for r in compiled} == {(64, 1), (64, 2)}
    assert all(r["compile_seconds"] > 0 for r in compiled)
    assert engine["diffusers_compiled"]["warmup_seconds_per_shape"].keys() == {"64_b1", "64_b2"}
    for r in engine["rows"]:
        assert {
            "system",
            "mode",
            "size",
            "batch",
            "steps",
            "images_per_s",
            "seconds_per_image_latency",
            "ms_per_step",
            "peak_mem_gb",
        } <= r.keys()
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
    # float32 on the CPU: the fast path (fused QKV, compiled blocks) and the engine equal diffusers
    assert all(v < 1e-4 for k, v in engine["accuracy"].items() if "latents" in k or "forward" in k), engine["accuracy"]
    assert engine["cache_memory_per_request"]["tiny_64"]["accounted_mb"] > 0

    modes = {(r["mode"], r["K"]) for r in caching["rows"]}
    assert modes == {("exact", 1), ("attention", 2), ("attention", 3), ("attention", 4), ("step", 5)}
    for r in caching["rows"]:
        # `a` is a ratio of two CPU timings here (noise on a shared 2-core machine): check the
        # arithmetic built on it, not its size
        a = r["a"]
        assert a > 0
        assert r["ideal_speedup"] == pytest.approx(1 / (a + (1 - a) / r["K"]), rel=1e-2, abs=2e-3)
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup_vs_exact"] / r["ideal_speedup"], rel=1e-2)
    assert "fraction_of_ideal_mean" in caching["summary"]


def _refusal(argv: list[str], capsys) -> str:
    """The bench's `main` in this process (a refusal builds nothing): its stderr, after a
    non-zero exit status."""
    from bench.engine_bench import main

    status, stderr = exit_status(main, argv, capsys)
    assert status != 0, stderr
    return stderr


def test_engine_bench_fp8_refuses_on_the_cpu(tmp_path, capsys):
    message = _refusal(["--smoke", "--fp8", "--out-dir", str(tmp_path), "--parts", "e2e"], capsys)
    assert "precision fp8 needs a CUDA GPU with FP8 tensor cores" in message, message
    assert not (tmp_path / "engine_cpu.json").exists()  # refused before building or measuring anything


def test_engine_bench_fp8_attention_refuses_on_the_cpu(tmp_path, capsys):
    message = _refusal(["--smoke", "--fp8-attention", "--out-dir", str(tmp_path), "--parts", "e2e"], capsys)
    assert "attention precision fp8 needs a Hopper GPU" in message, message
    assert not (tmp_path / "engine_cpu.json").exists()


def test_fp8_attention_rows_are_replaced_only_by_a_run_that_makes_them():
    from bench import merge_rows
    from bench.engine_bench_args import parse_args

    rows = [dict(system="sd3serve", mode=mode, model="sd3-medium", size=1024) for mode in ("exact-fp8-linears", "exact-fp8")]
    fp8 = parse_args(["--parts", "e2e", "--sizes", "1024", "--fp8"])
    fp8_attention = parse_args(["--parts", "e2e", "--sizes", "1024", "--fp8-attention"])
    assert fp8_attention.fp8  # implied

    def kept(args):
        return [r["mode"] for r in rows if merge_rows.keep_row(args, "sd3-medium", "sd3.5-large", "engine", r)]

    assert kept(fp8) == ["exact-fp8"] and kept(fp8_attention) == []
