"""The printed "go on" command and its variants: schedule errors suggest values that work, a continued run
says where its TensorBoard curves go, and printed commands carry no shell-escaped commas."""

from __future__ import annotations

import re
import sys

import pytest

from moc_megatron.training.arguments import parse_args, parse_run_config
from moc_megatron.training.checkpointing import CheckpointMismatchError
from moc_megatron.training.loop import _resume_hint, pretrain
from moc_megatron.training.validate_args import ArgumentsError


def tiny(*extra: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--vocab-size", "128", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "5e-3", "--min-lr", "5e-4", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", *extra,
    ]


def parse(*extra: str):
    return parse_args(tiny(*extra), world_size=1, exit_on_error=False)


def run(*extra: str):
    return pretrain(parse_run_config(tiny(*extra), world_size=1, exit_on_error=False))


WSD = ("--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--lr-warmup-iters", "20",
       "--lr-wsd-decay-iters", "40")


def suggested(message: str, flag: str) -> str:
    return re.search(rf"{flag} (\d+)", message.split(": give", 1)[1]).group(1)


def test_a_too_short_wsd_run_suggests_a_decay_and_a_length_that_work():
    with pytest.raises(ArgumentsError) as err:
        parse("--train-iters", "30", *WSD)
    message = str(err.value)
    assert message == ("--lr-wsd-decay-iters 40 is longer than the 10 iterations after warmup (--lr-decay-iters 30 "
                       "(the default: --train-iters) - --lr-warmup-iters 20): give --lr-wsd-decay-iters 10 or less "
                       "(e.g. 2, a fifth), or --train-iters 60 or more")
    shorter = [*WSD[:-1], suggested(message, "--lr-wsd-decay-iters")]
    assert parse("--train-iters", "30", *shorter).lr_wsd_decay_iters == 10
    assert parse("--train-iters", suggested(message, "--train-iters"), *WSD).lr_decay_iters == 60
    # with an explicit --lr-decay-iters it is that flag that must grow
    with pytest.raises(ArgumentsError, match=r"or --lr-decay-iters 60 or more"):
        parse("--train-iters", "100", "--lr-decay-iters", "30", *WSD)


def test_a_too_long_warmup_suggests_one_that_works():
    with pytest.raises(ArgumentsError) as err:
        parse("--train-iters", "10", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20")
    value = re.search(r"e\.g\. --lr-warmup-iters (\d+)", str(err.value)).group(1)
    assert parse("--train-iters", "10", "--lr-decay-style", "cosine", "--lr-warmup-iters", value).lr_warmup_iters == 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("go_on")
    run("--train-iters", "2", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--save", str(root / "ckpt"),
        "--tensorboard-dir", str(root / "tb"))
    return root


def test_another_schedule_names_the_checkpoints_values_and_they_resume(saved, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", ckpt)
    flags = ["--train-iters", "3", "--lr-decay-iters", "3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
             "--load", str(ckpt), "--save", str(ckpt)]
    with pytest.raises(CheckpointMismatchError) as err:
        run(*flags)
    values = re.search(r"give the checkpoint's values \(([^)]*)\)", str(err.value)).group(1)
    assert values == "--lr-decay-iters 2"
    i = flags.index("--lr-decay-iters")
    flags[i + 1] = values.split()[1]
    assert run(*flags).start_iteration == 2


def test_a_continued_run_says_it_appends_to_the_tensorboard_folder(saved, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", ckpt)
    tb = tmp_path / "tb"
    shutil.copytree(saved / "tb", tb)
    capsys.readouterr()
    run("--train-iters", "3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--load", str(ckpt),
        "--save", str(ckpt), "--tensorboard-dir", str(tb))
    out = capsys.readouterr().out
    assert f" > TensorBoard: {tb} holds 1 earlier event file(s); this run appends iterations 3.. to the same curves" \
        in out
    run("--train-iters", "2", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--tensorboard-dir", str(tb))
    assert "this run starts at iteration 1 and draws over its curves" in capsys.readouterr().out
    run("--train-iters", "2", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--tensorboard-dir", str(tmp_path / "new_tb"))
    assert "TensorBoard:" not in capsys.readouterr().out


def test_the_printed_command_has_no_escaped_commas(monkeypatch):
    argv = ["pretrain_moc.py", *tiny("--train-iters", "4", "--split", "98,2,0", "--save", "runs/x",
                                     "--lr-decay-style", "cosine", "--lr-warmup-iters", "1")]
    monkeypatch.setattr(sys, "argv", argv)
    hint = _resume_hint(parse_run_config(argv[1:], world_size=1, exit_on_error=False), "runs/x/iter_4")
    command = hint.splitlines()[2].strip()
    assert command.startswith("python pretrain_moc.py ") and command.endswith(" --load runs/x")
    assert "--split 98,2,0" in command and "\\" not in command
