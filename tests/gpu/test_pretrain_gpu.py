"""On a GPU: one training step of ``moc-tiny`` through ``pretrain_moc.py`` under torchrun, NCCL, mock data.

Skipped without CUDA (tests/gpu/conftest.py). ``scripts/gpu_check.sh`` runs it with each megatron-core it
brought along on ``PYTHONPATH`` (the subprocess inherits it).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_platform_uses_nccl_on_a_gpu():
    from moc_megatron.platform.device import dist_backend

    assert dist_backend() == "nccl"


def test_pretrain_moc_tiny_one_step_nccl(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29517",
           str(ROOT / "pretrain_moc.py"), "--preset", "moc-tiny", "--mock-data", "--bf16",
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
           "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               NCCL_DEBUG="INFO", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    log = proc.stdout + proc.stderr
    (tmp_path / "pretrain.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    match = re.search(r"iteration\s+1/\s*1 .*lm loss: ([0-9.Ee+-]+)", log)
    assert match, log[-4000:]
    assert math.isfinite(float(match.group(1))) and 5 < float(match.group(1)) < 12
    print(f"lm loss {match.group(1)}; NCCL initialised: {'NCCL INFO' in log}")
