"""Every TP / SP / EP layout of a memory layer gives the single-process outputs and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import run_distributed

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "workers" / "memory_layout_worker.py"
CASES = ["sequence:paper", "token:mixture", "chunk:paper", "chunk:mixture", "token:paper", "token:paper:skewed",
         "document:paper:documents", "document:mixture:documents", "chunk:paper:documents"]


def run_layout(tmp_dir: Path, tp: int, ep: int, sp: bool = False) -> dict:
    out = tmp_dir / f"tp{tp}_ep{ep}_sp{int(sp)}.pt"
    env = {"TP": str(tp), "EP": str(ep), "SP": str(int(sp)), "CASES": ",".join(CASES), "OUT": str(out)}
    run_distributed(WORKER, nprocs=tp * ep, env=env, timeout=300)
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run_layout(tmp_path_factory.mktemp("memory_ref"), 1, 1)


@pytest.mark.parametrize("tp, ep, sp", [(1, 2, False), (2, 1, False), (2, 1, True), (2, 2, True)],
                         ids=["ep2", "tp2", "tp2-sp", "tp2-ep2-sp"])
def test_parallel_layout_equals_single_process(tmp_path, reference, tp, ep, sp):
    parallel = run_layout(tmp_path, tp, ep, sp)
    for case in CASES:
        assert reference[case]["out"].abs().max() > 0 and reference[case]["bank_routed_grad"].abs().max() > 0
        if case.endswith("skewed"):  # every unit went to the first block of chapters: the rest got nothing
            assert reference[case]["bank_routed_grad"][4:].abs().max() == 0
        for name, want in reference[case].items():
            torch.testing.assert_close(parallel[case][name], want, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, n=f"{case} {name}": f"{n}: {m}")
