"""The README as a new user runs it: extending a run, what --load accepts, short argument errors, no
inapplicable warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from moc_megatron.checkpoint.layout import CheckpointNotFoundError
from moc_megatron.training.arguments import parse_args, parse_run_config
from moc_megatron.training.checkpointing import CheckpointMismatchError
from moc_megatron.training.config_from_args import transformer_config_from_args
from moc_megatron.training.loop import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(*extra: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--vocab-size", "128", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", *extra,
    ]


def run(*extra: str):
    return pretrain(parse_run_config(tiny(*extra), world_size=1, exit_on_error=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-iteration run saved at 2 and 4 (``--lr-decay-iters`` left to default from ``--train-iters``)."""
    save = tmp_path_factory.mktemp("first_hour") / "ckpt"
    result = run("--train-iters", "4", "--save", str(save), "--save-interval", "2")
    return save, result


def test_extending_a_run_with_a_larger_train_iters_keeps_the_schedule(saved, tmp_path, capsys):
    save, first = saved
    copy = tmp_path / "ckpt"
    import shutil

    shutil.copytree(save, copy)
    more = run("--train-iters", "6", "--load", str(copy), "--save", str(copy))
    assert more.start_iteration == 4 and sorted(more.lm_losses) == [5, 6]
    assert "resuming the checkpoint's LR schedule (--lr-decay-iters 4)" in capsys.readouterr().out
    # the same as a run planned with --lr-decay-iters 4 from the start
    planned = run("--train-iters", "6", "--lr-decay-iters", "4")
    assert more.lm_losses == {i: planned.lm_losses[i] for i in (5, 6)}


def test_another_schedule_is_one_line_naming_the_flags(saved):
    save, _ = saved
    with pytest.raises(CheckpointMismatchError) as err:
        run("--train-iters", "4", "--lr", "1e-2", "--load", str(save))
    message = str(err.value)
    assert "\n" not in message and "--lr 0.005 in the checkpoint, 0.01 here" in message
    assert "--override-opt_param-scheduler" in message
    overridden = run("--train-iters", "6", "--lr", "1e-2", "--load", str(save), "--override-opt_param-scheduler")
    assert overridden.start_iteration == 4


def test_the_checkpoints_schedule_wins_with_use_checkpoint_opt_param_scheduler(saved):
    """Another --lr/--min-lr with --use-checkpoint-opt_param-scheduler trains exactly as the checkpoint's (on
    megatron-core 0.19 the param groups are matched by their LR as well: the checkpoint's values must win)."""
    save, _ = saved
    kept = run("--train-iters", "6", "--lr-decay-iters", "4", "--load", str(save))
    # past --lr-decay-iters the LR is the minimum: change it too
    other_lr = run("--train-iters", "6", "--lr-decay-iters", "4", "--lr", "1e-2", "--min-lr", "1e-4", "--load",
                   str(save), "--use-checkpoint-opt_param-scheduler")
    assert sorted(other_lr.lm_losses) == [5, 6] and other_lr.lm_losses == kept.lm_losses


def test_load_accepts_a_save_folder_or_an_iter_folder_and_refuses_anything_else(saved, tmp_path):
    save, first = saved
    assert run("--train-iters", "4", "--load", str(save / "iter_0000002")).start_iteration == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("--train-iters", "2", "--load", str(empty)).start_iteration == 0
    with pytest.raises(CheckpointNotFoundError, match="no such folder"):
        run("--train-iters", "2", "--load", str(tmp_path / "missing"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match=r"holds files \(notes\.txt\) but no checkpoint"):
        run("--train-iters", "2", "--load", str(junk))
    no_tracker = tmp_path / "no_tracker"
    import shutil

    shutil.copytree(save / "iter_0000002", no_tracker / "iter_0000002")
    with pytest.raises(CheckpointNotFoundError, match=r"give --load .*no_tracker/iter_0000002"):
        run("--train-iters", "2", "--load", str(no_tracker))
    # the run's own --save folder without a checkpoint yet (an auto-resumed job before its first save)
    (junk / "tb").mkdir()
    assert run("--train-iters", "2", "--load", str(junk), "--save", str(junk)).start_iteration == 0


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "moc-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "5", "--lr", "1e-3",
      "--moc-num-chapters", "64", "--expert-model-parallel-size", "2"],
     "63 routed chapters (moc_num_chapters - moc_num_shared_chapters) do not divide evenly over "
     "expert-model-parallel-size 2"),
    (["--preset", "moc-tiny", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argument_error_is_two_lines_without_usage(argv, expected):
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_moc.py"), *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("pretrain_moc.py: error: ") and expected in lines[0], proc.stderr
    assert lines[1:] == ["  (see pretrain_moc.py --help)"], proc.stderr


def test_argument_error_printed_by_local_rank_0_only():
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_moc.py"), "--bad"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr == ""


def test_megatron_moe_and_cuda_graph_warnings_do_not_reach_our_runs():
    args = parse_args(["--preset", "moc-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "5",
                       "--lr", "1e-3", "--expert-model-parallel-size", "2"], world_size=2, exit_on_error=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = transformer_config_from_args(args)
    assert config.num_moe_experts == 64  # megatron's EP groups need it; the warnings about it do not apply
    assert [str(w.message) for w in caught] == []


def test_help_documents_every_flag_with_the_presets_defaults(capsys):
    from moc_megatron.training.finetune import build_finetune_parser

    parser = build_finetune_parser()
    assert [a.option_strings for a in parser._actions if not a.help] == []
    with pytest.raises(SystemExit) as exc:
        parse_args(["--preset", "moc-tiny", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text
    flat = " ".join(text.split())
    assert "--moc-num-chapters MOC_NUM_CHAPTERS Total chapters C in a bank, shared chapters included. " \
           "[MoCConfig default: 0] (current default: 65)" in flat
    assert "--hidden-size HIDDEN_SIZE Transformer hidden size. (default: 128)" in flat
