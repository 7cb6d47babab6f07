"""End-to-end CPU training in one process: loss falls, save -> resume is exact, checkpoints are safe.

The runs use a 2-layer MoC model (memory in layer 1) on megatron's mock data, with dropout on, so that the
resume check also covers the RNG states.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from moc_megatron.checkpoint.layout import TRACKER_FILENAME, read_tracker
from moc_megatron.platform.megatron_versions import read_common_state
from moc_megatron.training import checkpointing
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.checkpointing import CheckpointMismatchError
from moc_megatron.training.loop import pretrain

TRAIN_ITERS = 8


def tiny_args(*extra: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "128",
        "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(TRAIN_ITERS),
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--lr-decay-iters", str(TRAIN_ITERS), "--moc-memory-layers", "1", "--moc-num-chapters", "5",
        "--moc-chapter-size", "4", "--moc-top-k", "2", "--moc-memory-lr", "1e-2", "--log-interval", "4",
        "--eval-interval", "4", "--eval-iters", "1", "--num-workers", "0", *extra,
    ]


def run(*extra: str):
    return pretrain(parse_run_config(tiny_args(*extra), world_size=1, exit_on_error=False))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped after 4 iterations and resumed."""
    root = tmp_path_factory.mktemp("train")
    full = run("--save", str(root / "full"), "--save-interval", "4", "--tensorboard-dir", str(root / "tb"))
    first = run("--save", str(root / "split"), "--train-iters", "4")
    second = run("--load", str(root / "split"), "--save", str(root / "split"))
    return root, full, first, second


def test_loss_falls(runs):
    _, full, _, _ = runs
    losses = [full.lm_losses[i] for i in range(1, TRAIN_ITERS + 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses
    assert full.validation_losses[TRAIN_ITERS] < full.validation_losses[4]


def test_resume_continues_the_exact_loss_curve(runs):
    _, full, first, second = runs
    assert first.iteration == 4 and second.start_iteration == 4 and second.iteration == TRAIN_ITERS
    for i in range(1, 5):
        assert first.lm_losses[i] == pytest.approx(full.lm_losses[i], rel=1e-5, abs=1e-6)
    for i in range(5, TRAIN_ITERS + 1):
        assert second.lm_losses[i] == pytest.approx(full.lm_losses[i], rel=1e-5, abs=1e-6), i
    assert second.validation_losses[TRAIN_ITERS] == pytest.approx(full.validation_losses[TRAIN_ITERS], rel=1e-5)


def test_model_without_shared_chapters_saves_and_resumes_exactly(tmp_path):
    """``--moc-num-shared-chapters 0``: the bank has no ``shared`` entry, and save -> resume is exact."""
    from moc_megatron.hf.dist_reader import DistCheckpointReader

    zero = ("--moc-num-shared-chapters", "0", "--train-iters", "4", "--save-interval", "2")
    full = run(*zero, "--save", str(tmp_path / "full"))
    run(*zero, "--save", str(tmp_path / "split"), "--train-iters", "2")
    second = run(*zero, "--load", str(tmp_path / "split"), "--save", str(tmp_path / "split"))
    assert second.start_iteration == 2 and second.iteration == 4
    for i in (3, 4):
        assert second.lm_losses[i] == pytest.approx(full.lm_losses[i], rel=1e-5, abs=1e-6), i
    a, b = (DistCheckpointReader(str(tmp_path / name / "iter_0000004")) for name in ("full", "split"))
    bank = [k for k in a.tensors if k.startswith("memory_bank.")]
    assert bank == ["memory_bank.routed"], bank
    assert set(a.tensors) == set(b.tensors)
    for key in a.tensors:  # weights and optimizer state of the resumed run equal the uninterrupted run's
        torch.testing.assert_close(a.load(key), b.load(key), rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoint_layout(runs):
    root, full, _, _ = runs
    names = sorted(os.listdir(root / "full"))
    assert names == ["iter_0000004", "iter_0000008", TRACKER_FILENAME]
    assert read_tracker(str(root / "full")) == TRAIN_ITERS
    assert full.checkpoint == str(root / "full" / "iter_0000008")
    common = read_common_state(str(root / "full" / "iter_0000008"))
    assert common["iteration"] == TRAIN_ITERS
    assert common["train_state"]["consumed_train_samples"] == TRAIN_ITERS * 4
    assert common["args"]["hidden_size"] == 32 and common["model_signature"]["moc_num_chapters"] == 5
    assert "opt_param_scheduler" in common and common["checkpoint_version"] == 3.0


def test_tensorboard_has_losses_and_chapter_load(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = runs[0]
    events = EventAccumulator(str(root / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "learning-rate/memory", "grad-norm", "moc_load_balancing_loss",
            "moc_z_loss", "lm loss validation"} <= scalars
    assert {"moc/layer_1/chapter_load_entropy", "moc/layer_1/unused_chapter_fraction"} <= scalars
    assert "moc/layer_1/chapter_load" in events.Tags()["histograms"]


def test_mismatching_checkpoint_fails_clearly(runs):
    root = runs[0]
    with pytest.raises(CheckpointMismatchError) as exc:
        run("--load", str(root / "full"), "--hidden-size", "64", "--moc-num-chapters", "9")
    message = str(exc.value)
    assert "--hidden-size (hidden_size): checkpoint 32, this run 64" in message
    assert "--moc-num-chapters (moc_num_chapters): checkpoint 5, this run 9" in message


def test_crash_during_save_keeps_the_tracker_on_the_last_complete_checkpoint(runs, tmp_path, monkeypatch):
    root = runs[0]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "split", ckpt)
    (ckpt / TRACKER_FILENAME).write_text("4")
    shutil.rmtree(ckpt / "iter_0000008")
    real_save = checkpointing.dist_checkpointing.save

    def crashing_save(state, directory, *args, **kwargs):
        with open(os.path.join(directory, "__0_0.distcp"), "w") as f:
            f.write("partial")
        raise RuntimeError("simulated crash during save")

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("--load", str(ckpt), "--save", str(ckpt), "--train-iters", "5")
    assert read_tracker(str(ckpt)) == 4
    assert not (ckpt / "iter_0000005").exists()
    assert (ckpt / ".iter_0000005.partial").exists()

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", real_save)
    again = run("--load", str(ckpt), "--save", str(ckpt), "--train-iters", "5")
    assert again.start_iteration == 4 and read_tracker(str(ckpt)) == 5
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000005", TRACKER_FILENAME]


def test_trains_on_a_weighted_blend_of_real_datasets(tmp_path, tiny_corpus, sp_model, run_tool):
    prefixes = []
    for name in ("a", "b"):
        prefix = tmp_path / name
        assert run_tool("preprocess_data", "--input", tiny_corpus, "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", sp_model, "--append-eod", "--output-prefix", prefix,
                        "--workers", "1", "--no-progress") == 0
        prefixes.append(f"{prefix}_text_document")
    argv = [a for a in tiny_args("--train-iters", "3", "--eval-interval", "3") if a not in ("--mock-data",)]
    vocab = argv.index("--vocab-size")
    del argv[vocab:vocab + 2]
    args = parse_run_config([*argv, "--data-path", "0.7", prefixes[0], "0.3", prefixes[1], "--split", "90,10,0",
                       "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                       "--data-cache-path", str(tmp_path / "cache")], world_size=1, exit_on_error=False)
    result = pretrain(args)
    assert sorted(result.lm_losses) == [1, 2, 3] and 3 in result.validation_losses
    assert all(torch.isfinite(torch.tensor(list(result.lm_losses.values()))))
