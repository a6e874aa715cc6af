"""bench/caching_frontier.py and bench/frontier_summary.py: which point the summary picks at 2x
and 1.5x, when it has none (no GPU speed-up), cache-dit dominance, and the files it writes."""

from __future__ import annotations

import json

import pytest

from bench.cache_settings import CacheSetting, parse_setting
from bench.caching_frontier import main, row_setting
from bench.frontier_summary import FLOPS, Point, dominated_by, frontier_summary

GPU = "gpu: h200 1024² batch 16"


def point(setting, psnr, ssim=0.97, drop=0.0, flops=0.5, speedup=None, system="sd3serve"):
    source = FLOPS if speedup is None else GPU
    return Point(system, setting, psnr, ssim, 0.9 - drop, drop, flops, speedup or 1 / flops, source)


def test_summary_picks_the_best_point_meeting_the_bar_at_2x():
    ours = [
        point("a", 34.0, drop=0.02, flops=0.45, speedup=2.1),  # best PSNR but loses 2 points of judge
        point("b", 31.0, flops=0.46, speedup=2.05),
        point("c", 40.0, flops=0.62, speedup=1.58),
        point("d", 45.0, flops=0.7, speedup=1.4),  # not fast enough for either bar
    ]
    s = frontier_summary(ours, [])
    assert (s["setting_at_2x"], s["best_psnr_at_2x_db"], s["meets_2x_bar"]) == ("b", 31.0, True)
    assert s["accuracy_drop_at_2x"] == 0.0 and s["best_ssim_at_2x"] == 0.97
    assert (s["setting_at_1_5x"], s["best_psnr_at_1_5x_db"], s["meets_1_5x_bar"]) == ("c", 40.0, True)
    assert s["speedup_source"] == "gpu"


def test_summary_says_when_no_point_meets_the_bar():
    s = frontier_summary([point("a", 29.0, speedup=2.2), point("b", 33.0, ssim=0.94, speedup=2.0)], [])
    assert s["setting_at_2x"] == "b" and s["meets_2x_bar"] is False  # best PSNR, SSIM short
    assert s["meets_1_5x_bar"] is False


def test_measured_keys_are_null_without_gpu_speedups_and_flops_ideal_fills_in():
    ours = [point("a", 32.0, flops=0.48), point("b", 36.0, flops=0.6)]
    s = frontier_summary(ours, [point("x", 30.0, flops=0.55, system="cache-dit")])
    assert s["best_psnr_at_2x_db"] is None and s["accuracy_drop_at_2x"] is None
    assert s["dominates_cache_dit"] is None and s["speedup_source"] is None
    ideal = s["flops_ideal"]
    assert (ideal["setting_at_2x"], ideal["setting_at_1_5x"]) == ("a", "b")
    assert ideal["dominates_cache_dit"] is True and ideal["cache_dit_not_dominated"] == []


def test_dominance_needs_both_speed_and_psnr():
    theirs = [point("x", 37.0, flops=0.76, system="cache-dit"), point("y", 29.7, flops=0.50, system="cache-dit")]
    ours = [point("a", 36.0, flops=0.628, speedup=1.55), point("b", 30.0, flops=0.48, speedup=1.97)]
    s = frontier_summary(ours, theirs)
    # x: 1.316x ideal, 37 dB -> a is faster but 1 dB worse; y: 2.0x ideal beats b's measured 1.97x
    assert s["dominates_cache_dit"] is False and s["cache_dit_not_dominated"] == ["x", "y"]
    assert dominated_by(theirs[1], ours + [point("c", 31.0, flops=0.45, speedup=2.01)]).setting == "c"


def test_settings_name_the_same_thing_in_both_files():
    assert parse_setting("step:3:extrapolate:w1:f1").canonical() == "step:3:extrapolate"
    assert parse_setting("step:6:extrapolate:g2:w4").canonical() == "step:6:extrapolate:w4:g2"
    row = dict(
        policy="step", cache_interval=6, latent_aware="extrapolate", warmup_steps=4, final_fresh_steps=1, interval_growth=2
    )
    assert row_setting(row) == "step:6:extrapolate:w4:g2"
    assert row_setting(dict(policy="step", cache_interval=3, latent_aware="none", warmup_steps=4)) == "step:3:none:w4"
    assert CacheSetting("exact", 1, "none").name == "exact"


def quality_file(path, rows, prompts=40, stride=7, exact=0.925):
    exact_row = dict(policy="exact", cache_interval=1, latent_aware="none", judge_accuracy=exact, psnr_vs_exact=100.0)
    data = dict(prompts=prompts, stride=stride, steps=20, exact_accuracy=exact, rows=[exact_row, *rows])
    path.write_text(json.dumps(data))
    return path


def row(k, warmup, psnr, ssim, acc, flops):
    return dict(
        policy="step",
        cache_interval=k,
        latent_aware="extrapolate",
        warmup_steps=warmup,
        psnr_vs_exact=psnr,
        ssim_vs_exact=ssim,
        judge_accuracy=acc,
        flop_fraction=flops,
    )


def cache_dit_row(setting, psnr, flops, cached_steps, fn=1, bn=0):
    return dict(
        setting=setting,
        fn=fn,
        bn=bn,
        judge_accuracy=0.925,
        psnr_vs_exact=psnr,
        ssim_vs_exact=0.96,
        flop_fraction=flops,
        cached_steps_mean=cached_steps,
    )


def test_frontier_files_from_quality_and_gpu_speed(tmp_path):
    quality = quality_file(tmp_path / "q.json", [row(4, 5, 31.0, 0.962, 0.925, 0.475), row(2, 4, 40.0, 0.99, 0.925, 0.628)])
    cd_rows = [
        dict(setting="exact", judge_accuracy=0.925, psnr_vs_exact=100.0, ssim_vs_exact=1.0, flop_fraction=1.0),
        cache_dit_row("F1B0:0.32:ts1:w4:c3", 29.7, 0.502, cached_steps=12.0),
    ]
    cache_dit = tmp_path / "cd.json"
    cache_dit.write_text(json.dumps(dict(prompts=40, stride=7, steps=20, rows=cd_rows)))
    speed_rows = [
        dict(setting="exact", mode="exact", size=1024, batch=16, steps=20, speedup_vs_exact=1.0),
        dict(setting="step:4:extrapolate:w5:f1", mode="step", size=1024, batch=16, steps=20, speedup_vs_exact=2.04),
        dict(setting="step:2:extrapolate:w4", mode="step", size=1024, batch=16, steps=28, speedup_vs_exact=1.5),  # other steps
        dict(setting="step:2:extrapolate:w4", mode="step", size=1024, batch=8, steps=20, speedup_vs_exact=1.55),  # other batch
    ]
    speed = tmp_path / "caching_h200.json"
    speed.write_text(json.dumps(dict(card="h200", rows=speed_rows)))
    out = tmp_path / "frontier.json"
    args = ["--quality", str(quality), "--cache-dit", str(cache_dit), "--speed", str(speed), "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    by_setting = {p["setting"]: p for p in result["points"]}
    assert by_setting["step:4:extrapolate:w5"]["speedup"] == 2.04
    assert by_setting["step:4:extrapolate:w5"]["speedup_source"].startswith("gpu: h200")
    assert by_setting["step:2:extrapolate:w4"]["speedup_source"] == "flops"  # no row at 20 steps, batch 16
    assert by_setting["step:2:extrapolate:w4"]["speedup"] == pytest.approx(1 / 0.628)
    s = result["summary"]
    assert (s["setting_at_2x"], s["best_psnr_at_2x_db"], s["meets_2x_bar"]) == ("step:4:extrapolate:w5", 31.0, True)
    assert s["best_psnr_at_1_5x_db"] == 31.0  # the only measured point; 2x > 1.5x
    assert s["dominates_cache_dit"] is True  # 2.04x and 31 dB over 1.99x (ideal) and 29.7 dB
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_frontier_refuses_quality_files_of_different_prompt_sets(tmp_path):
    a = quality_file(tmp_path / "a.json", [row(3, 4, 32.0, 0.97, 0.9, 0.5)], prompts=40)
    b = quality_file(tmp_path / "b.json", [row(3, 4, 32.0, 0.97, 0.9, 0.5)], prompts=280, stride=1)
    with pytest.raises(SystemExit, match="different prompt sets"):
        main(["--quality", str(a), str(b), "--out", str(tmp_path / "f.json")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--quality", str(tmp_path / "missing.json"), "--out", str(tmp_path / "f.json")])


def test_confirm_files_get_their_own_summary(tmp_path):
    small = quality_file(tmp_path / "small.json", [row(3, 4, 32.0, 0.97, 0.925, 0.5)])
    big = quality_file(
        tmp_path / "big.json",
        [row(6, 3, 33.0, 0.975, 0.93, 0.47), row(4, 6, 38.0, 0.988, 0.936, 0.59)],
        prompts=280,
        stride=1,
        exact=0.936,
    )
    out = tmp_path / "f.json"
    assert main(["--quality", str(small), "--confirm", str(big), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    confirmed = result["summary_confirmed"]
    assert confirmed["prompts"] == 280 and result["prompts"] == 40
    ideal = confirmed["summary"]["flops_ideal"]
    assert (ideal["setting_at_2x"], ideal["meets_2x_bar"]) == ("step:6:extrapolate:w3", True)
    assert ideal["accuracy_drop_at_2x"] == pytest.approx(0.006)
    assert (ideal["setting_at_1_5x"], ideal["best_psnr_at_1_5x_db"]) == ("step:4:extrapolate:w6", 38.0)
    assert confirmed["summary"]["best_psnr_at_2x_db"] is None  # no GPU rows


def test_cache_dit_gpu_rows_of_another_schedule_are_not_used_and_deeper_models_are_compared(tmp_path):
    quality = quality_file(tmp_path / "q.json", [row(6, 3, 36.0, 0.984, 0.925, 0.476)])
    cd_rows = [
        dict(setting="exact", judge_accuracy=0.925, psnr_vs_exact=100.0, ssim_vs_exact=1.0, flop_fraction=1.0),
        cache_dit_row("F1B0:0.32:ts1:w4:c3", 29.7, 0.502, cached_steps=12.0),  # 6 blocks: 1 - 0.6 * 5/6
        cache_dit_row("F2B0:0.16:ts2:w4", 30.3, 0.678, cached_steps=9.7, fn=2),
    ]
    cache_dit = tmp_path / "cd.json"
    cache_dit.write_text(json.dumps(dict(prompts=40, stride=7, steps=20, rows=cd_rows)))
    cd_speed = tmp_path / "cd_speed.json"
    cd_speed_rows = [  # random weights: its residual test cached nothing, or a schedule of its own
        dict(setting="F1B0:0.32:ts1:w4:c3", size=1024, batch=1, steps=20, speedup=1.03, cached_steps=0),
        dict(setting="F2B0:0.16:ts2:w4", size=1024, batch=1, steps=20, speedup=1.7, cached_steps=10),
    ]
    cd_speed.write_text(json.dumps(dict(card="NVIDIA H200", rows=cd_speed_rows)))
    speed = tmp_path / "caching_h200.json"
    speed_row = dict(setting="step:6:extrapolate:w3", size=1024, batch=16, steps=20, speedup_vs_exact=2.09)
    speed.write_text(json.dumps(dict(card="h200", rows=[speed_row])))
    out = tmp_path / "frontier.json"
    args = ["--quality", str(quality), "--cache-dit", str(cache_dit), "--out", str(out)]
    assert main([*args, "--speed", str(speed), "--cache-dit-speed", str(cd_speed)]) == 0
    result = json.loads(out.read_text())
    by_setting = {p["setting"]: p for p in result["points"] if p["system"] == "cache-dit"}
    assert by_setting["F1B0:0.32:ts1:w4:c3"]["speedup_source"] == "flops"  # cached 0 of 12: not its speed
    assert "cached 0 of 20 steps" in result["cache_dit_speed_rows_not_used"]["F1B0:0.32:ts1:w4:c3"]
    assert by_setting["F2B0:0.16:ts2:w4"]["speedup"] == 1.7  # 10 against 9.7: the same schedule
    assert result["summary"]["dominates_cache_dit"] is True
    deep = result["summary_cache_dit_at_blocks"]
    assert deep["blocks"] == 24
    # 24 blocks: a cached step skips 23 of them, 1 / (1 - 0.6 * 23/24) = 2.35x, faster than 2.09x
    assert deep["points"]["F1B0:0.32:ts1:w4:c3"]["flop_speedup"] == pytest.approx(2.353, abs=1e-3)
    assert deep["points"]["F2B0:0.16:ts2:w4"]["flop_speedup"] == pytest.approx(1 / (1 - 0.485 * 22 / 24), abs=1e-3)
    assert deep["cache_dit_not_dominated"] == ["F1B0:0.32:ts1:w4:c3"] and deep["dominates_cache_dit"] is False
