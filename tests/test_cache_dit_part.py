"""bench/cache_dit_part.py's settings, FLOP accounting and forced schedules, bench.quality's
config parsing, and runs of cache-dit itself (a dev dependency) on the reference and tiny models."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.cache_dit_part import CacheDitSetting, main, parse_setting, skipped_fraction
from bench.cache_dit_speed import forced_mask
from bench.quality import parse_configs


def test_settings_parse_with_their_defaults():
    assert parse_setting("F1B0:0.08") == CacheDitSetting(1, 0, 0.08)
    s = parse_setting("F2B1:0.16:ts2:w4:c3")
    assert s == CacheDitSetting(2, 1, 0.16, taylorseer_order=2, warmup=4, max_continuous=3)
    assert s.label == "F2B1:0.16:ts2:w4:c3"
    assert parse_setting(s.label) == s
    for bad in ("F1:0.1", "F1B0", "F1B0:0.1:x2", "B0F1:0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_setting(bad)


def test_skipped_fraction_counts_the_middle_blocks_of_cached_steps():
    setting = CacheDitSetting(1, 1, 0.1)
    assert skipped_fraction(setting, layers=6, cached=10, steps=20, block_share=1.0) == pytest.approx(0.5 * 4 / 6)
    assert skipped_fraction(setting, layers=6, cached=0, steps=20, block_share=0.99) == 0.0


def test_quality_configs_parse_and_refuse_bad_ones():
    assert parse_configs("step:2:extrapolate,attention:3:extrapolate2-sigma:w4,step:6:extrapolate:w4:f2:g3") == [
        ("step", 2, "extrapolate", None, None, None),
        ("attention", 3, "extrapolate2-sigma", 4, None, None),
        ("step", 6, "extrapolate", 4, 2, 3),
    ]
    bad_ones = ("step:1:extrapolate", "exact:2:none", "step:2:taylor", "step:2:none:x4", "step:2", "step:2:none:w1:w2")
    for bad in bad_ones + ("step:2:none:f0", "step:2:none:g", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_configs(bad)


def test_quality_run_on_the_reference_model(tmp_path):
    pytest.importorskip("cache_dit")
    out = tmp_path / "cd.json"
    assert main(["quality", "--stride", "140", "--limit", "1", "--settings", "F1B0:0.5:ts1:w2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["exact", "F1B0:0.5:ts1:w2"]
    cached = rows[1]
    assert 0 < cached["cached_steps_mean"] <= 20 - 2  # a loose threshold caches after the warm-up
    assert 0 < cached["skipped_fraction"] < 1 and cached["psnr_vs_exact"] < 100


def test_forced_mask_caches_the_asked_steps_after_the_warm_up():
    mask = forced_mask(20, 12, warmup=4, max_continuous=3)
    assert len(mask) == 20 and mask.count(0) == 12
    assert mask[:4] == [1, 1, 1, 1] and mask[-1] == 1
    assert "0000" not in "".join(map(str, mask))
    spread = forced_mask(20, 6, warmup=4)
    assert spread.count(0) == 6 and "00" not in "".join(map(str, spread))  # spread out, not bunched
    assert forced_mask(10, 0, warmup=2) == [1] * 10
    with pytest.raises(ValueError, match="do not fit"):
        forced_mask(20, 16, warmup=4)  # 15 steps may be cached
    with pytest.raises(ValueError, match="max_continuous"):
        forced_mask(20, 13, warmup=4, max_continuous=3)


def test_speed_mode_times_the_schedule_its_quality_run_chose(tmp_path):
    pytest.importorskip("cache_dit")
    quality = tmp_path / "q.json"
    rows = [dict(setting="exact", cached_steps_mean=0.0), dict(setting="F1B0:0.16:w2", cached_steps_mean=9.8)]
    quality.write_text(json.dumps(dict(steps=20, rows=rows)))
    out = tmp_path / "speed.json"
    argv = ["speed", "--random", "tiny", "--device", "cpu", "--size", "64", "--steps", "10", "--repeats", "1"]
    assert main([*argv, "--cached-steps-from", str(quality), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schedule"].startswith("forced")
    forced = result["rows"][1]
    assert forced["setting"] == "F1B0:0.16:w2" and forced["mask"] == "1100101001"
    assert forced["cached_steps"] == 5  # 9.8 of 20 steps, scaled to 10: cache-dit did cache them
    with pytest.raises(SystemExit, match="not in"):
        main([*argv, "--settings", "F2B0:0.1", "--cached-steps-from", str(quality), "--out", str(out)])
