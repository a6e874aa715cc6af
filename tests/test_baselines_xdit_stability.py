"""The seed paper's other baselines in the engine bench (issue 21): Stability's reference sampler
on a tiny MMDiTX, xDiT's refusal on the CPU (and its wrapper on a GPU), the summary ratios, the
merge rule and the Figure-3 plot."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import merge_rows, stability_ref as sr
from bench.plot import _medians, figure3
from bench.summary import engine_summary
from tests.bench_rows import bench_row

ROOT = Path(__file__).resolve().parent.parent


def _reference() -> sr.Reference:
    try:
        return sr.load_reference()
    except sr.ReferenceUnavailable as exc:
        pytest.skip(f"Stability's reference sampler is not available here: {exc}")


# -- Stability's reference sampler --------------------------------------------------------------


def test_reference_refuses_clearly_without_its_files(tmp_path):
    with pytest.raises(sr.ReferenceUnavailable, match="fetch_stability_ref.sh"):
        sr.load_reference(tmp_path)


def test_reference_schedule_is_the_shifted_flow_schedule():
    ref = _reference()
    model = sr.build_model(ref, sr.SHAPES["tiny"], torch.device("cpu"), torch.float32)
    sched = sr.sigmas(model, 28)
    assert len(sched) == 29 and sched[-1] == 0.0
    shifted = lambda t: 3.0 * t / (1 + 2.0 * t)  # noqa: E731 - shift 3: SD3's sigma(t)
    # timesteps evenly from sigma_max's (1000) to sigma_min's (1000 * shifted(1/1000)), shifted again
    t = torch.linspace(1.0, shifted(torch.tensor(0.001)).item(), 28)
    assert torch.allclose(sched[:-1], shifted(t), atol=1e-6)
    assert sched[0] == pytest.approx(1.0)


def test_reference_sampler_is_flow_matching_euler_with_cfg_on_a_tiny_mmditx():
    """Its Euler over CFGDenoiser (denoised = x - sigma * v) is x + (sigma_next - sigma) * v with the
    guided velocity: recomputed here from the bare MMDiTX, uncond and cond rows as we feed them."""
    ref = _reference()
    torch.manual_seed(0)
    shape = sr.SHAPES["tiny"]
    model = sr.build_model(ref, shape, torch.device("cpu"), torch.float32)
    cond = sr.random_conditioning(shape, 2, "cpu", torch.float32, seed=1)
    uncond = sr.random_conditioning(shape, 2, "cpu", torch.float32, seed=2)
    steps, cfg, seeds = 3, 5.0, [11, 12]
    latents, images = sr.generate(ref, model, None, seeds, 64, steps, cfg, cond, uncond)
    assert latents.shape == (2, 16, 8, 8) and images == []

    x = torch.cat([torch.randn((1, 16, 8, 8), generator=torch.manual_seed(s)) for s in seeds])
    sched = sr.sigmas(model, steps)
    with torch.no_grad():
        for sigma, sigma_next in zip(sched[:-1], sched[1:]):
            v = model.diffusion_model(
                torch.cat([x, x]),
                (sigma * 1000).expand(4),
                y=torch.cat([cond.y, uncond.y]),
                context=torch.cat([cond.c_crossattn, uncond.c_crossattn]),
            )
            v_cond, v_uncond = v.chunk(2)
            x = x + (sigma_next - sigma) * (v_uncond + cfg * (v_cond - v_uncond))
    expected = x / 1.5305 + 0.0609  # SD3's latent format, as the driver applies after sampling
    assert torch.allclose(latents, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents, x)  # the comparison sees the latent format


def test_reference_decodes_to_pil_images_and_marks_every_step():
    ref = _reference()
    shape = sr.SHAPES["tiny"]
    model = sr.build_model(ref, shape, torch.device("cpu"), torch.float32)
    vae = sr.build_vae(ref, torch.device("cpu"), torch.float32)
    marks: list[int] = []
    cond = sr.random_conditioning(shape, 1, "cpu", torch.float32, seed=3)
    _, images = sr.generate(ref, model, vae, [5], 64, 2, 7.0, cond, cond, mark=lambda: marks.append(1))
    assert len(marks) == 2 + 1  # one per step, one after the decode
    assert [im.size for im in images] == [(64, 64)]


@pytest.mark.slow
def test_engine_bench_stability_ref_part_writes_rows(tmp_path):
    _reference()
    cmd = [
        sys.executable,
        "-m",
        "bench.engine_bench",
        "--smoke",
        "--out-dir",
        str(tmp_path),
        "--parts",
        "stability-ref",
        "--stability-batches",
        "1,2",
        "--small-reps",
        "1",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    engine = json.loads((tmp_path / "engine_cpu.json").read_text())
    rows = engine["rows"]
    assert {(r["system"], r["batch"], r["batched_through_sampler"]) for r in rows} == {
        ("stability-ref", 1, False),
        ("stability-ref", 2, True),
    }
    for r in rows:
        assert r["text_tokens"] == 154 and r["steps"] == 3 and r["images_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["vae_decode_ms"] > 0
    note = engine["stability_ref"]
    assert note["latents_finite"] == {"64_b1": True, "64_b2": True}
    assert "model moves" in note["excluded"] and "text encoders" in note["excluded"]


# -- xDiT ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_xdit_part_refuses_on_the_cpu_before_building_anything(tmp_path):
    from bench.xdit_part import XditUnavailable, import_xfuser

    with pytest.raises(XditUnavailable, match="needs a CUDA GPU"):
        import_xfuser()
    cmd = [sys.executable, "-m", "bench.engine_bench", "--smoke", "--out-dir", str(tmp_path), "--parts", "xdit"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "xDiT (xfuser 0.7.0) needs a CUDA GPU" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "engine_cpu.json").exists()


@pytest.mark.gpu
def test_xdit_wrapper_computes_what_diffusers_computes_on_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("xfuser", reason="xfuser wheels not installed")
    from bench.runs import requests, run_diffusers
    from bench.shapes import build_pipeline
    from bench.xdit_part import XditPart, import_xfuser, single_process_environment, xdit_pipeline

    device = torch.device("cuda")
    pipe = build_pipeline("tiny", device, torch.float32)
    xfuser = import_xfuser()
    single_process_environment()
    try:
        wrapped = xdit_pipeline(xfuser, pipe, use_torch_compile=False)
        reqs = requests("x", 2, 64, 3, unique=False)
        _, ours = run_diffusers(wrapped, device, reqs, output_type="latent")
        _, theirs = run_diffusers(pipe, device, reqs, output_type="latent")
        assert torch.equal(ours.images, theirs.images)
        assert type(pipe.scheduler).__module__.startswith("diffusers")  # the bench's pipeline keeps its own
    finally:
        XditPart._destroy_distributed()


# -- summary, merge, plot -----------------------------------------------------------------------


_row = bench_row


ROWS = [
    _row("diffusers", "eager", 1024, 1, 0.60),
    _row("diffusers", "eager", 1024, 16, 0.70),
    _row("xdit", "eager", 1024, 1, 0.58),
    _row("xdit", "eager", 1024, 16, 0.69),
    _row("xdit-compile", "compiled", 1024, 16, 0.80),
    _row("xdit-compile", "compiled", 1024, 4, 0.75),
    _row("stability-ref", "euler-cfg-fp16", 1024, 1, 0.50),
    _row("stability-ref", "euler-cfg-fp16", 1024, 1, 0.54),
    _row("stability-ref", "euler-cfg-fp16", 1024, 1, 0.52),
    _row("sd3serve", "exact-fast", 1024, 1, 0.78),
    _row("sd3serve", "exact-fast", 1024, 16, 0.96),
    _row("sd3serve", "attention-k3-fast", 1024, 16, 1.40),
    _row("xdit", "eager", 512, 16, 2.5),
    _row("sd3serve", "exact-fast", 512, 16, 2.0),
]


def test_summary_divides_sd3serve_exact_by_each_baselines_best_row():
    s = engine_summary(dict(rows=ROWS))
    assert s["xdit_best_images_per_s_1024"] == dict(value=0.80, batch=16, system="xdit-compile")
    assert s["exact_vs_xdit_1024"] == round(0.96 / 0.80, 3)
    assert s["cached_k3_vs_xdit_1024"] == round(1.40 / 0.80, 3)
    assert s["stability_best_images_per_s_1024"] == dict(value=0.52, batch=1, system="stability-ref")  # median of 3
    assert s["exact_vs_stability_1024"] == round(0.96 / 0.52, 3)
    assert s["targets"]["exact_vs_xdit_1024"] == dict(target=1.0, value=1.2, met=True)
    assert s["exact_vs_xdit_512"] == 0.8  # reported at every size; the target is at 1024² only
    assert "exact_vs_stability_512" not in s


def test_summary_targets_are_unmet_without_the_rows():
    s = engine_summary(dict(rows=[r for r in ROWS if r["system"] not in ("xdit", "xdit-compile", "stability-ref")]))
    assert s["targets"]["exact_vs_xdit_1024"]["met"] is False
    assert s["targets"]["exact_vs_stability_1024"] == dict(target=1.0, value=None, met=False)


def test_merge_keeps_other_parts_rows_and_replaces_its_own():
    args = argparse.Namespace(parts=("xdit",), sizes=[1024], batches=[1, 2, 4, 8, 16], fp8=False)
    keep = [r for r in ROWS if merge_rows.keep_row(args, "sd3-medium", "sd3.5-large", "engine", r)]
    assert [r for r in ROWS if not r["system"].startswith("xdit")] == [r for r in keep if not r["system"].startswith("xdit")]
    assert [(r["system"], r["size"]) for r in keep if r["system"].startswith("xdit")] == [("xdit", 512)]  # other sizes stay
    e2e = argparse.Namespace(parts=("e2e",), sizes=[512, 1024], batches=[1, 2, 4, 8, 16], fp8=False)
    kept = {r["system"] for r in ROWS if merge_rows.keep_row(e2e, "sd3-medium", "sd3.5-large", "engine", r)}
    assert kept == {"xdit", "xdit-compile", "stability-ref"}  # an e2e run no longer drops the baselines


def test_figure3_medians_and_png(tmp_path):
    rows = ROWS + [_row("xdit-compile", "compiled", 1024, 1, 0.1, timed_run_included_compile=True)]
    medians = _medians(rows, 1024)
    assert medians[("stability-ref", "euler-cfg-fp16")] == {1: 0.52}
    assert 1 not in medians[("xdit-compile", "compiled")]  # a run that compiled inside its timing is left out
    path = tmp_path / "engine_h200.json"
    path.write_text(json.dumps(dict(rows=rows, card="h200", torch="2.11", diffusers="0.42.1")))
    out = figure3(path)
    assert out.name == "engine_h200_fig3.png" and out.stat().st_size > 20_000
