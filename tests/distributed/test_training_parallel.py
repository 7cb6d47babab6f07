"""pretrain_moc.py under torchrun (gloo): parallel layouts train the same model as one process.

- DP=2 (distributed optimizer, 2 micro-batches per rank) equals DP=1 with 4 accumulated micro-batches.
- PP=2, PP=2 with an interleaved schedule (two memory-layer chunks, hence two bank copies on one rank),
  TP=2 with sequence parallelism and EP=2 (routed chapters split over two ranks), resumed from the
  single-process checkpoint (model and optimizer resharded; under PP the bank lives on both stages and
  its gradients are summed over the bank group), continue its loss curve exactly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from launch import run_distributed

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[2] / "pretrain_moc.py"
ITERS, SAVED_AT = 6, 3
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+) \|")


def common_args(*extra: str) -> list[str]:
    # Vocabulary 256: padded to 128 x TP it stays 256 at TP=1 and TP=2, so the checkpoints match.
    return [
        "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "256",
        "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--moc-memory-layers", "1", "3", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--moc-bank-lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", *extra,
    ]


def train(nprocs: int, *extra: str) -> dict[int, float]:
    output = run_distributed(SCRIPT, nprocs=nprocs, args=common_args(*extra), timeout=240)
    losses = {int(i): float(v) for i, v in LOSS_LINE.findall(output)}
    assert losses, output[-3000:]
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the losses, and a checkpoint at iteration SAVED_AT."""
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    losses = train(1, "--save", str(ckpt), "--save-interval", str(SAVED_AT))
    return losses, ckpt


def resumable_copy(ckpt: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt / f"iter_{SAVED_AT:07d}", copy / f"iter_{SAVED_AT:07d}")
    (copy / "latest_checkpointed_iteration.txt").write_text(str(SAVED_AT))
    return copy


def assert_same_losses(got: dict[int, float], want: dict[int, float], iterations) -> None:
    for i in iterations:
        assert got[i] == pytest.approx(want[i], rel=2e-6), f"iteration {i}: {got} vs {want}"


def test_reference_loss_falls(reference):
    losses, _ = reference
    assert losses[ITERS] < losses[1] - 0.2, losses


def test_data_parallel_equals_gradient_accumulation(reference):
    losses, _ = reference
    assert_same_losses(train(2, "--use-distributed-optimizer"), losses, range(1, ITERS + 1))


@pytest.mark.parametrize("layout", [
    ["--pipeline-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--expert-model-parallel-size", "2"],
], ids=["pp2", "pp2-vpp2", "tp2-sp", "dp2-ep2"])
def test_parallel_layout_continues_single_process_run(reference, tmp_path, layout):
    losses, ckpt = reference
    resumed = train(2, *layout, "--load", str(resumable_copy(ckpt, tmp_path)))
    assert sorted(resumed) == list(range(SAVED_AT + 1, ITERS + 1))
    assert_same_losses(resumed, losses, range(SAVED_AT + 1, ITERS + 1))
