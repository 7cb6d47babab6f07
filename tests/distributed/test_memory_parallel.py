"""Every TP / SP / EP layout of a memory layer gives the single-process outputs and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import run_distributed

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "memory_layout_worker.py"


def run_layout(tmp_path: Path, tp: int, ep: int, unit: str, gating: str, sp: bool = False) -> dict:
    out = tmp_path / f"tp{tp}_ep{ep}_sp{int(sp)}_{unit}_{gating}.pt"
    env = {"TP": str(tp), "EP": str(ep), "SP": str(int(sp)), "UNIT": unit, "GATING": gating, "OUT": str(out)}
    run_distributed(WORKER, nprocs=tp * ep, env=env, timeout=240)
    return torch.load(out)


LAYOUTS = [
    # (tp, ep, sp, unit, gating)
    (1, 2, False, "sequence", "paper"),
    (1, 2, False, "token", "mixture"),
    (2, 1, False, "chunk", "paper"),
    (2, 1, True, "chunk", "mixture"),
    (2, 2, True, "token", "paper"),
]


@pytest.mark.parametrize("tp, ep, sp, unit, gating", LAYOUTS)
def test_parallel_layout_equals_single_process(tmp_path, tp, ep, sp, unit, gating):
    reference = run_layout(tmp_path, 1, 1, unit, gating)
    parallel = run_layout(tmp_path, tp, ep, unit, gating, sp)
    assert reference["out"].abs().max() > 0 and reference["bank_routed_grad"].abs().max() > 0
    for name, want in reference.items():
        torch.testing.assert_close(parallel[name], want, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
