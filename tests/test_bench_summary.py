"""The engine benchmark's summary ratios: each engine mode against diffusers eager (kept) and
against the best diffusers row, eager or compiled (issue 17), from known rows."""

from __future__ import annotations

import json

from bench.precision_quality import note_in_engine_results
from bench.summary import engine_summary
from tests.bench_rows import bench_row


_row = bench_row


ROWS = [
    _row("diffusers", "eager", 1024, 1, 0.50, 2.00),
    _row("diffusers", "eager", 1024, 16, 0.60, 26.7),
    _row("diffusers-compiled", "compiled", 1024, 1, 0.80, 1.25),
    _row("diffusers-compiled", "compiled", 1024, 16, 0.90, 17.8),
    _row("sd3serve", "exact-fast", 1024, 1, 0.85, 1.00),
    _row("sd3serve", "exact-fast", 1024, 16, 0.99, 16.2),
    _row("sd3serve", "exact-fp8", 1024, 1, 1.10, 0.80),
    _row("sd3serve", "exact-fp8", 1024, 16, 1.35, 11.9),
    _row("sd3serve", "attention-k3-fp8", 1024, 16, 1.70, 9.4),
    # at 512² diffusers eager is the faster one (compile did not pay): the best row is eager's
    _row("diffusers", "eager", 512, 1, 2.0, 0.50),
    _row("diffusers-compiled", "compiled", 512, 1, 1.6, 0.60),
    _row("sd3serve", "exact-fast", 512, 1, 2.5, 0.40),
]


def test_twins_divide_by_the_best_diffusers_row_and_keep_the_eager_ratios():
    s = engine_summary(dict(rows=ROWS))
    assert s["exact_vs_diffusers_1024"] == round(0.99 / 0.60, 3)  # eager ratio kept
    assert s["exact_vs_diffusers_best_1024"] == round(0.99 / 0.90, 3)
    assert s["fp8_vs_diffusers_best_1024"] == round(1.35 / 0.90, 3)
    assert s["fp8_cached_vs_diffusers_best_1024"] == round(1.70 / 0.90, 3)
    assert s["b1_latency_vs_diffusers_1024"] == round(2.00 / 1.00, 3)
    assert s["b1_latency_vs_diffusers_best_1024"] == round(1.25 / 1.00, 3)
    assert s["fp8_b1_latency_vs_diffusers_best_1024"] == round(1.25 / 0.80, 3)
    assert s["diffusers_best_any_images_per_s_1024"] == dict(value=0.90, batch=16, system="compiled")
    assert s["exact_vs_diffusers_best_512"] == s["exact_vs_diffusers_512"] == round(2.5 / 2.0, 3)
    assert s["b1_latency_vs_diffusers_best_512"] == round(0.50 / 0.40, 3)
    targets = s["targets"]
    assert targets["exact_vs_diffusers_best_1024"]["met"] and targets["fp8_vs_diffusers_best_1024"]["met"]
    assert not targets["fp8_cached_vs_diffusers_best_1024"]["met"]  # 1.889 < 2.0
    assert targets["fp8_reference_psnr_db"] == dict(target=30.0, value=None, met=False)


def test_fp8_reference_quality_enters_the_summary():
    s = engine_summary(
        dict(
            rows=ROWS,
            fp8_reference_quality=dict(fp8_reference_psnr_db=34.2, fp8_reference_ssim=0.97, fp8_reference_accuracy_drop=0.4),
        )
    )
    assert s["fp8_reference_psnr_db"] == 34.2 and s["fp8_reference_accuracy_drop"] == 0.4
    assert s["targets"]["fp8_reference_psnr_db"]["met"] and s["targets"]["fp8_reference_accuracy_drop"]["met"]
    worse = engine_summary(dict(rows=ROWS, fp8_reference_quality=dict(fp8_reference_accuracy_drop=1.5)))
    assert not worse["targets"]["fp8_reference_accuracy_drop"]["met"]


def test_the_fp8_quality_run_notes_its_numbers_in_the_engine_results(tmp_path):
    path = tmp_path / "engine_h200.json"
    path.write_text(json.dumps(dict(rows=ROWS, summary={})))
    note_in_engine_results(path, dict(fp8_reference_psnr_db=31.5, fp8_reference_accuracy_drop=0.0, prompts=280))
    data = json.loads(path.read_text())
    assert data["fp8_reference_quality"]["prompts"] == 280
    assert data["summary"]["fp8_reference_psnr_db"] == 31.5
    assert data["summary"]["exact_vs_diffusers_best_1024"] == round(0.99 / 0.90, 3)  # rows summarised again


def test_the_fp8_linears_quality_run_notes_its_own_keys(tmp_path):
    path = tmp_path / "engine_h200.json"
    path.write_text(json.dumps(dict(rows=ROWS, summary={})))
    note_in_engine_results(path, dict(fp8_reference_psnr_db=29.0, fp8_reference_accuracy_drop=1.4))
    note_in_engine_results(path, dict(fp8_linears_reference_psnr_db=31.9, fp8_linears_reference_accuracy_drop=0.0), "fp8_linears")
    summary = json.loads(path.read_text())["summary"]
    assert (summary["fp8_reference_psnr_db"], summary["fp8_linears_reference_psnr_db"]) == (29.0, 31.9)
    assert summary["fp8_linears_reference_accuracy_drop"] == 0.0
    # the bars are the FP8 mode's (FP8 attention too), not the linears-only twin's
    assert not summary["targets"]["fp8_reference_psnr_db"]["met"]
    assert not summary["targets"]["fp8_reference_accuracy_drop"]["met"]


def test_the_fp8_block_probe_enters_the_summary_and_merges_by_variant(tmp_path):
    from bench.fp8_compile_probe import note_in_engine_results as note_probe

    path = tmp_path / "engine_x.json"
    path.write_text(json.dumps(dict(rows=ROWS)))
    fp8 = dict(variant="fp8-dynamic-untuned", forward_ms=40.0, first_call_s=120.0, profile_tottime="...")
    note_probe(path, dict(size=1024, rows=32, variants=[fp8]))
    assert "fp8_linears_block_forward_speedup_1024" not in json.loads(path.read_text())["summary"]  # no bf16 row yet
    note_probe(path, dict(size=1024, rows=32, variants=[dict(variant="bf16-dynamic", forward_ms=50.0, first_call_s=20.0)]))
    data = json.loads(path.read_text())
    assert data["summary"]["fp8_linears_block_forward_speedup_1024"] == 1.25
    assert "fp8_block_forward_speedup_1024" not in data["summary"]  # no FP8-attention variant yet
    assert data["summary"]["fp8_block_compile_s"] == {"fp8-dynamic-untuned": 120.0, "bf16-dynamic": 20.0}
    assert all("profile_tottime" not in v for v in data["fp8_block_probe"]["variants"])
    # the engine's FP8 blocks compile with multi-kernel since call e12: that variant is the ratio's
    engine_fp8 = dict(variant="fp8-dynamic-mk", forward_ms=40.0 / 1.1, first_call_s=17.0)
    with_fp8_attention = dict(variant="fp8attn-dynamic-mk", forward_ms=40.0, first_call_s=25.0)
    note_probe(path, dict(size=1024, rows=32, variants=[engine_fp8, with_fp8_attention]))
    summary = json.loads(path.read_text())["summary"]
    assert (summary["fp8_linears_block_forward_speedup_1024"], summary["fp8_block_forward_speedup_1024"]) == (1.375, 1.25)
    # the engine's FP8 blocks since call e14 (sigmoid-form GELU) take the FP8 ratio when measured
    engine_now = dict(variant="fp8attnsg-dynamic-mk", forward_ms=40.0 / 1.05, first_call_s=25.0)
    linears_now = dict(variant="fp8sg-dynamic-mk", forward_ms=40.0, first_call_s=20.0)
    note_probe(path, dict(size=1024, rows=32, variants=[engine_now, linears_now]))
    summary = json.loads(path.read_text())["summary"]
    assert summary["fp8_block_forward_speedup_1024"] == round(50.0 / (40.0 / 1.05), 3)
    assert summary["fp8_linears_block_forward_speedup_1024"] == 1.25
