"""The widest layout a CPU runs, TP=2 x PP=2 x EP=2 (8 gloo processes, DP=2), and optimizer-state portability.

One chain of pretrain_moc.py runs, all with the distributed optimizer, against one uninterrupted
single-process run (the reference, which saves at iteration 4 in megatron's ``fully_reshardable`` format):

1. TP=2 (sequence parallel) x PP=2 (a memory layer on each stage) x EP=2 (2 of the 4 routed chapters per
   rank) loads the reference checkpoint (weights, optimizer state, scheduler) and trains iterations 5-6:
   the losses and gradient norms equal the reference's. It saves at iteration 6 (``fully_reshardable``).
2. One process loads that checkpoint and trains iterations 7-8: the reference's losses again. It saves at
   iteration 7 in the default format (``dp_reshardable``: no ``--dist-ckpt-optim-fully-reshardable``).
3. That checkpoint at DP=2 (same TP/PP/EP): the optimizer state reshards over DP, iteration 8 equals.
4. That checkpoint at EP=2: refused in one line naming both layouts and ``--no-load-optim``.

Runs from scratch at different PP sizes start from different weights, so every layout starts from a
checkpoint. Losses are compared to the printed digits (as test_training_parallel.py), gradient norms too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from launch import run_distributed

from moc_megatron.platform.megatron_versions import read_common_state

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[2] / "pretrain_moc.py"
ITERS = 8
REFERENCE_SAVED_AT, WIDE_END, SINGLE_SAVED_AT = 4, 6, 7
WIDE = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
        "--expert-model-parallel-size", "2"]
FULLY = "--dist-ckpt-optim-fully-reshardable"
LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+) \|.*? grad norm: ([0-9.]+) \|")


def args(train_iters: int, *extra: str) -> list[str]:
    # --lr-decay-iters fixes the schedule, so a run may stop early (--train-iters) and save there.
    # Vocabulary 256: padded to 128 x TP it stays 256 at TP=1 and TP=2. Chapters: 1 shared + 4 routed.
    return [
        "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "256",
        "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(train_iters),
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--lr-decay-iters", str(ITERS), "--hidden-dropout", "0", "--attention-dropout", "0",
        "--moc-memory-layers", "1", "3", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--moc-bank-lr", "1e-2", "--use-distributed-optimizer", "--log-interval", "1", "--eval-iters", "0",
        "--num-workers", "0", *extra,
    ]


def train(nprocs: int, train_iters: int, *extra: str, timeout: float = 300) -> tuple[dict, str]:
    """``({iteration: (lm loss, grad norm)}, output)`` of one pretrain_moc.py run."""
    output = run_distributed(SCRIPT, nprocs=nprocs, args=args(train_iters, *extra), timeout=timeout)
    logged = {int(i): (float(loss), float(norm)) for i, loss, norm in LOG_LINE.findall(output)}
    assert logged, output[-3000:]
    return logged, output


def only(ckpt: Path, iteration: int, dst: Path) -> Path:
    """A save folder holding just ``iteration`` of ``ckpt``."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(ckpt / name, dst / name)
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dst


def common_state(ckpt: Path, iteration: int) -> dict:
    return read_common_state(str(ckpt / f"iter_{iteration:07d}"))


def assert_same(got: dict, want: dict, iterations) -> None:
    assert sorted(got) == list(iterations), got
    for i in iterations:
        assert got[i][0] == pytest.approx(want[i][0], rel=2e-6), f"lm loss, iteration {i}: {got} vs {want}"
        assert got[i][1] == pytest.approx(want[i][1], abs=1e-3), f"grad norm, iteration {i}: {got} vs {want}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, iterations 1-8, saving at 4 (fully reshardable) and 8."""
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    logged, _ = train(1, ITERS, FULLY, "--save", str(ckpt), "--save-interval", str(REFERENCE_SAVED_AT))
    assert sorted(logged) == list(range(1, ITERS + 1))
    assert logged[ITERS][0] < logged[1][0] - 0.2, logged
    return logged, ckpt


@pytest.fixture(scope="module")
def wide(reference, tmp_path_factory):
    """TP=2 x PP=2 x EP=2 from the reference's iteration 4 to 6, saving at 6."""
    _, ckpt = reference
    root = tmp_path_factory.mktemp("wide")
    saved = root / "ckpt"
    logged, output = train(8, WIDE_END, *WIDE, FULLY, "--load", str(only(ckpt, REFERENCE_SAVED_AT, root / "load")),
                           "--save", str(saved), timeout=480)
    assert f"at iteration {REFERENCE_SAVED_AT}" in output
    return logged, saved


@pytest.fixture(scope="module")
def single_from_wide(wide, tmp_path_factory):
    """One process from the wide layout's iteration 6 to 8, saving at 7 without the fully-reshardable flag."""
    _, ckpt = wide
    root = tmp_path_factory.mktemp("single")
    saved = root / "ckpt"
    logged, output = train(1, ITERS, "--load", str(only(ckpt, WIDE_END, root / "load")),
                           "--save", str(saved), "--save-interval", str(SINGLE_SAVED_AT))
    assert f"at iteration {WIDE_END}" in output
    return logged, saved


def test_wide_layout_continues_the_single_process_run(reference, wide):
    assert_same(wide[0], reference[0], range(REFERENCE_SAVED_AT + 1, WIDE_END + 1))
    state = common_state(wide[1], WIDE_END)
    assert state["parallel_layout"] == {"tp": 2, "pp": 2, "dp": 2, "ep": 2, "vpp": None}
    assert state["optimizer_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"


def test_wide_checkpoint_continues_at_one_process(reference, single_from_wide):
    assert_same(single_from_wide[0], reference[0], range(WIDE_END + 1, ITERS + 1))
    state = common_state(single_from_wide[1], SINGLE_SAVED_AT)
    assert state["parallel_layout"]["tp"] == state["parallel_layout"]["dp"] == 1
    assert state["optimizer_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"


def test_dp_reshardable_state_reshards_over_data_parallel_ranks(reference, single_from_wide, tmp_path):
    load = only(single_from_wide[1], SINGLE_SAVED_AT, tmp_path / "load")
    logged, _ = train(2, ITERS, "--load", str(load))
    assert_same(logged, reference[0], [ITERS])


def test_dp_reshardable_state_at_another_layout_is_refused_in_one_line(single_from_wide, tmp_path):
    load = only(single_from_wide[1], SINGLE_SAVED_AT, tmp_path / "load")
    with pytest.raises(pytest.fail.Exception) as failed:
        train(2, ITERS, "--expert-model-parallel-size", "2", "--load", str(load))
    lines = [line for line in str(failed.value).splitlines() if "error:" in line and "dp_reshardable" in line]
    assert len(lines) == 1, str(failed.value)[-3000:]  # once, by LOCAL_RANK 0
    assert "saved at TP=1 x PP=1 x EP=1 (DP=1)" in lines[0] and "this run's TP=1 x PP=1 x EP=2 (DP=2)" in lines[0]
    assert "--no-load-optim" in lines[0] and FULLY in lines[0]
    assert "[rank0]: Traceback" not in str(failed.value)
