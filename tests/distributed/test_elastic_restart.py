"""Elastic restarts: torchrun --max-restarts after a rank is SIGKILLed resumes every rank from the last
checkpoint and finishes on the loss curve of an uninterrupted run.

Two ranks (EP=2, DP=2, dropout on, so RNG states and the data position matter) with ``--save`` and
``--load`` naming the same folder; rank 1 kills itself after iteration 5 (``MOC_FAULT_KILL``), after
the checkpoint of iteration 4 and before the one of iteration 6. torchrun restarts both ranks (round 1),
they load iteration 4, log the restart in one line and train to the end. Every logged loss of the final
round equals the uninterrupted run's, to the printed digits (the resume is exact).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from launch import run_distributed

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[2] / "pretrain_moc.py"
ITERS, SAVE_INTERVAL, KILLED_AFTER = 8, 4, 5
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+) \|")


def args(ckpt: Path) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "128",
        "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--expert-model-parallel-size", "2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(SAVE_INTERVAL),
    ]


def losses_of(output: str) -> dict[int, str]:
    """Iteration -> printed loss; a later line for the same iteration (the restarted round) wins."""
    return {int(i): v for i, v in LOSS_LINE.findall(output)}


def test_killed_rank_restarts_from_the_last_checkpoint_on_the_same_loss_curve(tmp_path):
    reference_output = run_distributed(SCRIPT, nprocs=2, args=args(tmp_path / "reference"), timeout=240)
    reference = losses_of(reference_output)
    assert sorted(reference) == list(range(1, ITERS + 1))

    output = run_distributed(SCRIPT, nprocs=2, args=args(tmp_path / "elastic"), timeout=300, max_restarts=1,
                             env={"MOC_FAULT_KILL": f"1:{KILLED_AFTER}"})
    assert f"fault injection: rank 1 killed after iteration {KILLED_AFTER}" in output
    assert f"loaded checkpoint {tmp_path / 'elastic'}/iter_{SAVE_INTERVAL:07d} at iteration {SAVE_INTERVAL}" \
        in output, output[-3000:]
    assert (f" > restart: torchrun restarted the ranks after a rank failed (restart 1 of --max-restarts 1); "
            f"resuming from iteration {SAVE_INTERVAL} ({tmp_path / 'elastic'})") in output
    assert " > restart:" not in reference_output
    assert "Connection refused" not in output.split("loaded checkpoint")[-1]
    restarted = losses_of(output.split("loaded checkpoint")[-1])
    assert sorted(restarted) == list(range(SAVE_INTERVAL + 1, ITERS + 1))
    assert restarted == {i: reference[i] for i in restarted}
    assert losses_of(output) == reference
    assert (tmp_path / "elastic" / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
