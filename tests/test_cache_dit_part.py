"""bench/cache_dit_part.py's settings and FLOP accounting, and bench.quality's config parsing.
The run against cache-dit itself needs its venv (bench/README.md); elsewhere it is skipped."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.cache_dit_part import CacheDitSetting, main, parse_setting, skipped_fraction
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
