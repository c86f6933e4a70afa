"""The Makefile's demo: the U-Net's width follows the hardware unless the user sets it (`make -n`, nothing run)."""
from __future__ import annotations

import subprocess
import sys

import torch

from tests.script_fixtures import REPO
from utils.helpers import cpu_has_bf16


def demo_train_line(*settings: str) -> str:
    proc = subprocess.run(["make", "-n", "demo", f"PY={sys.executable}", *settings], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = [ln for ln in proc.stdout.splitlines() if " train.py " in ln]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_make_demo_trains_width_32_where_training_is_fast_and_16_elsewhere():
    fast = torch.cuda.is_available() or cpu_has_bf16()
    assert f" --width {32 if fast else 16} " in demo_train_line()


def test_make_demo_width_and_epochs_can_be_chosen():
    line = demo_train_line("DEMO_WIDTH=8", "DEMO_EPOCHS=3")
    assert " --width 8 " in line and " --epochs 3 " in line
