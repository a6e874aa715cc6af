"""bench/fp8_attention_probe.py on the CPU at tiny shapes: the SDPA baseline is timed and checked
against float32 attention, every low-precision candidate is reported skipped with the reason it
cannot run here, FP8 rounding of Q/K/V costs a measurable error, and bad arguments are refused.
On a Hopper GPU (marked gpu) the FA3 rows must run where fa3-fwd is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.fp8_attention_kernels import CANDIDATES, FP8_MAX, Kernel, quantize_per_head
from bench.fp8_attention_probe import INPUT_KINDS, _probe_kernel, attention_inputs, fp32_attention, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--rows", "1,2", "--heads", "2", "--tokens", "48", "--head-dim", "64", "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("probe") / "fp8_attention_cpu.json"
    returned = main(["--device", "cpu", "--out", str(out), *TINY])
    return returned, json.loads(out.read_text())


def test_cpu_run_writes_every_shape_with_a_timed_accurate_sdpa_baseline(cpu_result):
    returned, written = cpu_result
    assert written == json.loads(json.dumps(returned))
    assert written["device"] == "cpu" and written["torch"] == torch.__version__
    assert [s["shape"] for s in written["shapes"]] == [[1, 2, 48, 64], [2, 2, 48, 64]]
    for shape in written["shapes"]:
        base = shape["sdpa"][shape["sdpa_baseline"]]
        assert base["ms"] > 0
        assert base["rel_err_vs_fp32"] < 1e-2  # bf16 attention against float32


def test_cpu_run_skips_every_candidate_with_its_reason(cpu_result):
    _, written = cpu_result
    names = [c.name for c in CANDIDATES]
    assert list(written["candidates"]) == names
    for name, entry in written["candidates"].items():
        assert entry["status"] == "skipped", name
        assert "failed" in entry["reason"] or "needs a CUDA GPU" in entry["reason"], entry
    for shape in written["shapes"]:
        assert {n: r["status"] for n, r in shape["candidates"].items()} == dict.fromkeys(names, "skipped")
    assert {"fa3-fwd", "sageattention", "flash-attn-4", "fbgemm-gpu-genai", "torchao"} <= set(written["package_facts"])


def test_fp8_rounding_of_qkv_costs_a_visible_but_bounded_error(cpu_result):
    _, written = cpu_result
    for shape in written["shapes"]:
        emulated = shape["fp8_qkv_emulated"]
        assert emulated["status"] == "ok"
        for kind in INPUT_KINDS:
            assert 5e-3 < emulated[f"rel_err_vs_sdpa_{kind}"] < 0.3, (kind, emulated)


def test_quantize_per_head_maps_each_heads_amax_to_fp8_max_and_round_trips():
    x = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16) * torch.tensor([0.01, 1.0, 50.0]).view(1, 3, 1, 1)
    x[1, 2] = 0  # an all-zero head must not divide by zero
    x8, descale = quantize_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and x8.stride() == x.stride()
    assert descale.dtype == torch.float32 and descale.shape == (2, 3)
    peaks = x8.float().abs().amax(dim=(2, 3))
    live = torch.ones(2, 3, dtype=torch.bool)
    live[1, 2] = False
    assert torch.allclose(peaks[live], torch.full_like(peaks[live], FP8_MAX), rtol=0.07)
    back = x8.float() * descale[:, :, None, None]
    assert torch.isfinite(back).all() and back[1, 2].abs().max() == 0
    err = (back - x.float()).norm() / x.float().norm()
    assert 1e-3 < err < 0.07  # e4m3 keeps 3 mantissa bits


def test_a_kernel_that_returns_garbage_is_reported_failed_not_ok():
    inputs = {kind: attention_inputs((1, 2, 16, 64), kind, torch.device("cpu"), seed=i) for i, kind in enumerate(INPUT_KINDS)}
    refs = {kind: fp32_attention(*qkv) for kind, qkv in inputs.items()}
    nan_kernel = Kernel(lambda q, k, v: (q,), lambda q: torch.full_like(q, float("nan")))
    row = _probe_kernel(nan_kernel, inputs, refs, refs, None, 1.0)
    assert row["status"] == "failed" and "bad output on normal inputs" in row["reason"]


@pytest.mark.parametrize(
    "bad, message",
    [(["--candidates", "fa3_fwd_fp8,nope"], "unknown candidates ['nope']"), (["--rows", "2,0"], "must be a positive integer")],
)
def test_bad_arguments_are_refused_with_a_clear_message(tmp_path, bad, message):
    cmd = [sys.executable, "-m", "bench.fp8_attention_probe", "--device", "cpu", "--out", str(tmp_path / "x.json"), *bad]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU")
def test_fa3_rows_run_on_hopper(tmp_path):
    pytest.importorskip("fa3_fwd_interface")
    out = tmp_path / "fp8_attention.json"
    result = main(
        ["--out", str(out), "--rows", "1", "--heads", "4", "--tokens", "1024", "--candidates", "fa3_fwd_fp8,fa3_fwd_bf16"]
    )
    rows = result["shapes"][0]["candidates"]
    assert rows["fa3_fwd_bf16"]["status"] == "ok" and rows["fa3_fwd_bf16"]["rel_err_vs_sdpa_normal"] < 1e-2
    assert rows["fa3_fwd_fp8"]["status"] == "ok" and rows["fa3_fwd_fp8"]["rel_err_vs_sdpa_normal"] < 0.1
