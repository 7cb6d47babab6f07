"""Faults during I/O and training: a save killed mid-way, truncated or corrupt datasets, NaN losses.

- A real ``pretrain_moc.py`` process is SIGKILLed while its save of iteration 4 is stalled after every
  file was written but before publication (``MOC_FAULT_STALL_SAVE``): the tracker stays on iteration 2,
  nothing named like a checkpoint appears, and resuming gives the uninterrupted run's losses.
- Truncated or corrupt ``.bin``/``.idx`` stop the run at start-up naming the file.
- A NaN loss stops before the optimizer step naming the iteration, or is skipped with a flag.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from moc_megatron.checkpoint.layout import TRACKER_FILENAME, read_tracker, resolve_load
from moc_megatron.data.dataset_check import DatasetFileError, check_indexed_dataset
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.loop import pretrain
from moc_megatron.training.nan_check import NonFiniteLossError
from moc_megatron.training.train_step import forward_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(*extra: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "128",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", *extra,
    ]


def run(*extra: str, **kw):
    return pretrain(parse_run_config(tiny(*extra), world_size=1, exit_on_error=False), **kw)


def test_killed_save_leaves_the_previous_checkpoint_and_nothing_that_looks_complete(tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, os.path.join(REPO, "pretrain_moc.py"),
           *tiny("--mock-data", "--save", str(save), "--save-interval", "2")]
    env = {**os.environ, "MOC_FAULT_STALL_SAVE": "4", "OMP_NUM_THREADS": "1", "MOC_FORCE_CPU": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "save of iteration 4 stalled" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail("the run ended without stalling:\n" + "".join(lines))
        staging = save / ".iter_0000004.partial"
        assert (staging / "metadata.json").is_file()  # every file of iteration 4 is written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert read_tracker(str(save)) == 2
    assert sorted(p.name for p in save.iterdir() if not p.name.startswith(".")) == ["iter_0000002", TRACKER_FILENAME]
    assert resolve_load(str(save)) == (str(save / "iter_0000002"), 2)

    resumed = run("--mock-data", "--save", str(save), "--load", str(save), "--save-interval", "2")
    reference = run("--mock-data")
    assert resumed.start_iteration == 2 and sorted(resumed.lm_losses) == [3, 4]
    assert resumed.lm_losses == {i: reference.lm_losses[i] for i in (3, 4)}
    assert read_tracker(str(save)) == 4 and not staging.exists()


@pytest.fixture(scope="module")
def corpus_prefix(tmp_path_factory, tiny_corpus, sp_model, run_tool) -> str:
    root = tmp_path_factory.mktemp("faults_data")
    assert run_tool("preprocess_data", "--input", tiny_corpus, "--output-prefix", root / "c",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--append-eod", "--no-progress") == 0
    return str(root / "c_text_document")


def _damaged_copy(prefix: str, tmp_path, damage) -> str:
    copy = str(tmp_path / "damaged_text_document")
    for suffix in (".bin", ".idx", ".tokenizer.json"):
        shutil.copy(prefix + suffix, copy + suffix)
    damage(copy)
    return copy


def _truncate(path: str, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - nbytes)


def _corrupt_pointer(prefix: str) -> None:
    with open(prefix + ".idx", "r+b") as f:
        header = f.read(34)
        count = int.from_bytes(header[18:26], "little")
        f.seek(34 + 4 * count + 8 * 3)  # the fourth sequence pointer
        f.write((123456789).to_bytes(8, "little"))


@pytest.mark.parametrize("damage, match", [
    (lambda p: _truncate(p + ".bin", 10), r"damaged_text_document\.bin: .* truncated"),
    (lambda p: _truncate(p + ".idx", 8), r"damaged_text_document\.idx: .* truncated or corrupt"),
    (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), r"damaged_text_document\.idx: not a Megatron"),
    (_corrupt_pointer, r"damaged_text_document\.idx: sequence lengths and pointers disagree"),
    (lambda p: os.remove(p + ".bin"), r"damaged_text_document\.bin: no such file"),
])
def test_damaged_dataset_stops_at_startup_naming_the_file(corpus_prefix, sp_model, tmp_path, damage, match):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    summary = check_indexed_dataset(corpus_prefix)
    ds = IndexedDataset(corpus_prefix)
    assert summary.sequences == len(ds) and summary.tokens == int(ds.sequence_lengths.sum())
    damaged = _damaged_copy(corpus_prefix, tmp_path, damage)
    with pytest.raises(DatasetFileError, match=match):
        check_indexed_dataset(damaged)
    args = parse_run_config(tiny("--data-path", damaged, "--split", "90,10,0", "--tokenizer-type",
                           "SentencePieceTokenizer", "--tokenizer-model", sp_model), world_size=1, exit_on_error=False)
    with pytest.raises(DatasetFileError, match=match):
        pretrain(args)


def _nan_at_iteration(iteration: int, microbatches: int):
    calls = {"n": 0}

    def step(data_iterator, model):
        calls["n"] += 1
        output, loss = forward_step(data_iterator, model)
        if (calls["n"] - 1) // microbatches + 1 == iteration:
            output = output * float("nan")
        return output, loss

    return step


def test_nan_loss_stops_naming_the_iteration():
    with pytest.raises(NonFiniteLossError, match=r"^iteration 3: the loss is NaN or Inf; stopped before"):
        run("--mock-data", forward_step_func=_nan_at_iteration(3, 2))


def test_nan_loss_skipped_with_the_flag_leaves_the_weights_untouched():
    skipped = run("--mock-data", "--skip-nan-loss-iterations", "--train-iters", "3",
                  forward_step_func=_nan_at_iteration(3, 2))
    assert skipped.skipped_iterations == [3] and skipped.iteration == 3
    assert math.isnan(skipped.lm_losses[3])
    # iteration 3 changed nothing: training on gives finite losses, and without the check NaN spreads
    unchecked = run("--mock-data", "--no-check-for-nan-in-loss-and-grad", forward_step_func=_nan_at_iteration(3, 2))
    assert unchecked.skipped_iterations == [] and math.isnan(unchecked.lm_losses[4])
    on = run("--mock-data", "--skip-nan-loss-iterations", forward_step_func=_nan_at_iteration(3, 2))
    assert on.skipped_iterations == [3] and all(math.isfinite(on.lm_losses[i]) for i in (1, 2, 4))
    assert torch.isfinite(torch.tensor(on.lm_losses[4]))
