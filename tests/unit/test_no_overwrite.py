"""A run never overwrites a checkpoint it did not start from, and a misspelled --load is an error.

Every refusal must leave the --save folder exactly as it was: the tracker and every iter_* folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_first_hour import run, tiny  # tests/unit is on sys.path under pytest

from moc_megatron.checkpoint.layout import (
    TRACKER_FILENAME,
    CheckpointNotFoundError,
    CheckpointOverwriteError,
    read_tracker,
)
from moc_megatron.training.finetune import finetune, parse_finetune_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshot(root) -> dict[str, tuple[int, int, bytes | None]]:
    """Every file under ``root``: size, modification time, and the content of small files (the tracker)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            small = open(path, "rb").read() if st.st_size < 64 else None
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, small)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-iteration run saved at iterations 2 and 4."""
    save = tmp_path_factory.mktemp("no_overwrite") / "ckpt"
    run("--train-iters", "4", "--save", str(save), "--save-interval", "2")
    assert read_tracker(str(save)) == 4 and (save / "iter_0000002").is_dir()
    return save


def refused(save, *argv: str) -> str:
    """Run ``argv``; assert it is refused in one line and ``save`` is untouched; return the message."""
    before = snapshot(save)
    with pytest.raises(CheckpointOverwriteError) as err:
        run(*argv)
    assert snapshot(save) == before
    message = str(err.value)
    assert "\n" not in message
    return message


def test_save_into_a_checkpoint_folder_without_load_is_refused(saved):
    message = refused(saved, "--train-iters", "2", "--save", str(saved))
    assert message == (f"--save {saved} already holds a checkpoint at iteration 4 ({TRACKER_FILENAME}), but this "
                       f"run starts from scratch (no --load): resume it with --load {saved}, or give a new --save "
                       "folder")


def test_save_into_a_checkpoint_folder_loading_another_folder_is_refused(saved, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    message = refused(saved, "--train-iters", "6", "--load", str(other), "--save", str(saved))
    assert f"but this run starts from --load {other}: resume it with --load {saved}" in message
    # an older iter_* folder of the same --save folder would overwrite the newer checkpoint
    message = refused(saved, "--train-iters", "6", "--load", str(saved / "iter_0000002"), "--save", str(saved))
    assert "newer than --load" in message and "iteration 4" in message


def test_finetune_flag_into_its_own_load_folder_is_refused(saved):
    message = refused(saved, "--train-iters", "2", "--load", str(saved), "--save", str(saved), "--finetune")
    assert "--finetune starts at iteration 0" in message


def test_iter_folders_without_a_tracker_count_as_a_checkpoint(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved / "iter_0000002", save / "iter_0000002")
    message = refused(save, "--train-iters", "2", "--save", str(save))
    assert "checkpoints up to iteration 2 (iter_* folders)" in message


def test_a_folder_without_a_checkpoint_is_a_fine_save_target(tmp_path):
    save = tmp_path / "ckpt"
    (save / ".iter_0000002.partial").mkdir(parents=True)  # an interrupted first save is not a checkpoint
    (save / "notes.txt").write_text("hello")
    assert run("--train-iters", "2", "--save", str(save)).iteration == 2
    assert read_tracker(str(save)) == 2


def test_resuming_the_save_folder_or_its_newest_iter_folder_is_allowed(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    assert run("--train-iters", "5", "--load", str(save / "iter_0000004"), "--save", str(save)).start_iteration == 4
    assert run("--train-iters", "6", "--load", str(save), "--save", str(save)).start_iteration == 5
    assert read_tracker(str(save)) == 6


def test_load_of_a_missing_folder_is_an_error_unless_it_is_the_save_folder(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointNotFoundError, match=r"--load .*missing: no such folder"):
        run("--train-iters", "2", "--load", str(missing))
    with pytest.raises(CheckpointNotFoundError, match=r"no such folder"):
        run("--train-iters", "2", "--load", str(missing), "--save", str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()
    # auto-resume (the SLURM and torchrun launchers): --load and --save name the same, not yet created, folder
    assert run("--train-iters", "2", "--load", str(missing), "--save", str(missing)).start_iteration == 0
    assert read_tracker(str(missing)) == 2


def test_finetune_moc_into_a_folder_holding_a_finetuning_checkpoint_is_refused(saved, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(saved, ft)
    before = snapshot(ft)
    # refused before the (here absent) SFT data is opened
    argv = tiny("--train-iters", "2", "--pretrained-checkpoint", str(saved), "--save", str(ft))
    argv.remove("--mock-data")
    argv += ["--sft-data-path", str(tmp_path / "chat"), "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", str(tmp_path / "tok.model")]
    with pytest.raises(CheckpointOverwriteError, match=f"resume it with --load {ft}, or give a new --save folder"):
        finetune(parse_finetune_run_config(argv, world_size=1, exit_on_error=False))
    assert snapshot(ft) == before


def test_the_command_line_refusal_is_one_line_and_status_1(saved):
    before = snapshot(saved)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_moc.py"),
                           *tiny("--train-iters", "2", "--save", str(saved))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pretrain_moc.py: error: --save {saved} already holds a checkpoint at iteration 4 ({TRACKER_FILENAME}), "
        f"but this run starts from scratch (no --load): resume it with --load {saved}, or give a new --save folder"]
    assert snapshot(saved) == before


def test_a_misspelled_load_stops_before_anything_is_built(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "chekpoints"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_moc.py"),
                           *tiny("--train-iters", "2", "--load", str(missing))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout  # no model was built
    assert proc.stderr.strip().splitlines() == [
        f"pretrain_moc.py: error: --load {missing}: no such folder (to start from scratch leave out --load; an "
        "auto-resuming job gives --load and --save the same folder)"]
