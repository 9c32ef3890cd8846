"""The peer check against diffusers' own training scripts, where their source is at hand.

The scripts are never vendored: set PIXFLEET_DIFFUSERS_EXAMPLES to a diffusers checkout's
examples/controlnet folder to run it (benchmarks/RESULTS.md records the last run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = os.environ.get("PIXFLEET_DIFFUSERS_EXAMPLES")


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not EXAMPLES,
    reason="set PIXFLEET_DIFFUSERS_EXAMPLES to diffusers' examples/controlnet (no installable package has them)",
)
@pytest.mark.parametrize("script", ["train_controlnet.py", "train_controlnet_sdxl.py"])
def test_the_step_one_loss_equals_the_diffusers_scripts(script):
    check = Path(__file__).parents[2] / "benchmarks" / "peer_check.py"
    result = subprocess.run(
        [sys.executable, str(check), "--script", str(Path(EXAMPLES) / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "peer check passed" in result.stdout
