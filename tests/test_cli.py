"""`sd3serve generate`: prompts in, PNGs out; bad input gives a one-line error, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.entry_points import exit_status

ROOT = Path(__file__).resolve().parent.parent


def sd3serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sd3serve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_generate_a_batch_from_a_prompts_file(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "images"
    result = sd3serve(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts-file",
        str(prompts),
        "--seed",
        "5",
        "--steps",
        "3",
        "--width",
        "80",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000-5.png", "001-6.png"]
    assert Image.open(files[0]).size == (80, 64)
    assert "seed=5\ta red circle" in result.stdout


def test_generate_rejects_bad_input_before_loading(tiny_model_dir, tmp_path, capsys):
    from sd3serve.cli import main

    # In this process: exit_status lets any exception other than SystemExit through (a traceback).
    status, stderr = exit_status(main, ["generate", "x", "--model", str(tiny_model_dir), "--width", "100"], capsys)
    assert status != 0
    assert "width: must be a multiple of 16" in stderr
    assert "Traceback" not in stderr
    status, stderr = exit_status(main, ["generate", "x", "--model", str(tmp_path / "nope")], capsys)
    assert status != 0 and "does not exist" in stderr


def test_generate_over_the_cache_budget_is_a_clear_error(tmp_path):
    # the reference model's cache is ~2 MB per request (6 layers, 88 tokens, CFG, extrapolation)
    result = sd3serve(
        "generate",
        "a red circle on a blue background",
        "--cache-interval",
        "3",
        "--cache-policy",
        "attention",  # without a policy, 3 is the step-policy preset, which keeps no attention cache
        "-o",
        str(tmp_path / "x.png"),
        env={"SD3SERVE_CACHE_BUDGET_MB": "1"},
    )
    assert result.returncode != 0
    assert "more attention-cache memory than the budget" in result.stderr
    assert "Traceback" not in result.stderr
    bad = sd3serve("generate", "x", env={"SD3SERVE_CACHE_BUDGET_MB": "lots"})
    assert bad.returncode != 0 and "SD3SERVE_CACHE_BUDGET_MB" in bad.stderr and "Traceback" not in bad.stderr
