"""tools/compare_optimizers.py without training: bad counts are usage errors, and the report finds the first
evaluated step at which Muon reaches AdamW's final loss."""
from __future__ import annotations

import argparse
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tools import compare_optimizers


def test_counts_below_one_are_usage_errors():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "compare_optimizers.py"), "--steps", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr


def test_report_names_the_step_that_reaches_adamws_final_loss():
    args = argparse.Namespace(steps=30, batch_size=4, learning_rate=1e-3)
    runs = {"adamw": {"val": {10: 7.0, 20: 6.5, 30: 6.2}, "seconds": 1.0, "device": "cpu"},
            "muon": {"val": {10: 7.5, 20: 6.2, 30: 6.0}, "seconds": 2.0, "device": "cpu"}}
    text = compare_optimizers.report("tiny", runs, args)
    assert "Muon reaches it at step 20 (0.67x the steps)" in text
    assert "     30     6.2000     6.0000       -0.2000" in text
    runs["muon"]["val"] = {10: 7.5, 20: 6.9, 30: 6.3}
    assert "no evaluated step up to 30" in compare_optimizers.report("tiny", runs, args)
