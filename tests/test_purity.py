"""The pure modules import no torch: the scheduler's and slot table's tests pass with torch blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_scheduler_tests_pass_without_torch():
    code = BLOCK_TORCH + (
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_scheduler.py', 'tests/test_slots.py',\n"
        "                      'tests/test_fair_share.py', 'tests/test_fair_share_mixed.py', 'tests/test_validation.py',\n"
        "                      'tests/test_fresh_schedule.py']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout


def test_light_modules_do_not_import_torch():
    code = (
        "import sys, engine, engine.request, engine.config, engine.scheduler, engine.step_plan, engine.slots, engine.fresh_plan\n"
        "import engine.fair_share\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
