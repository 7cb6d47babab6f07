"""The blocked path's block-by-block projection and read gives, under TP x EP x SP, the one-projection outputs.

The reference is one process with the K/V of every chapter with traffic projected at once; the layouts project
two chapters (of 4 x 32 memory tokens) at a time, so every read site (the local read, the expert-parallel
owners' partials merged by log-sum-exp, the tensor-parallel K/V projections recomputed in backward) goes through
moc_megatron/kernels/projected.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import run_distributed

pytestmark = pytest.mark.distributed

WORKERS = Path(__file__).parent / "workers"
CASES = ["sequence:paper", "token:mixture", "chunk:paper", "token:paper:skewed"]


def run_layout(tmp_dir: Path, tp: int, ep: int, sp: bool, projected: bool) -> dict:
    out = tmp_dir / f"tp{tp}_ep{ep}_sp{int(sp)}_{int(projected)}.pt"
    env = {"TP": str(tp), "EP": str(ep), "SP": str(int(sp)), "CASES": ",".join(CASES), "OUT": str(out)}
    worker = "memory_layout_worker.py"
    if projected:
        worker = "projected_layout_worker.py"
        env["PROJECTION_BLOCK_ELEMENTS"] = str(2 * 4 * 32)
    run_distributed(WORKERS / worker, nprocs=tp * ep, env=env, timeout=300)
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run_layout(tmp_path_factory.mktemp("projected_ref"), 1, 1, False, projected=False)


@pytest.mark.parametrize("tp, ep, sp", [(1, 1, False), (2, 2, True)], ids=["single", "tp2-ep2-sp"])
def test_projected_read_equals_one_projection(tmp_path, reference, tp, ep, sp):
    parallel = run_layout(tmp_path, tp, ep, sp, projected=True)
    for case in CASES:
        assert reference[case]["out"].abs().max() > 0 and reference[case]["bank_routed_grad"].abs().max() > 0
        for name, want in reference[case].items():
            torch.testing.assert_close(parallel[case][name], want, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, n=f"{case} {name}": f"{n}: {m}")
