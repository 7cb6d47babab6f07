"""``python -m moc_megatron.training.preflight``: the launchers' one-process check of flags and inputs."""

from __future__ import annotations

import pytest

from moc_megatron.training import preflight

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3"]


def test_good_inputs_pass_for_the_launchers_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    preflight.main([*TINY, "--mock-data", "--vocab-size", "128"])
    assert capsys.readouterr().err.strip() == "pretrain_moc.py: flags and inputs checked for 4 ranks"


def test_missing_dataset_is_pretrain_moc_one_line_error(tmp_path, sp_model, capsys):
    prefix = tmp_path / "nowhere" / "corpus_text_document"
    with pytest.raises(SystemExit) as exit_info:
        preflight.main([*TINY, "--data-path", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", sp_model])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"pretrain_moc.py: error: {prefix}.idx: no such file (dataset prefix '{prefix}')\n"


def test_flags_are_validated_for_the_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # a global batch of 4 does not divide over 3 data-parallel ranks
    with pytest.raises(SystemExit) as exit_info:
        preflight.main([*TINY, "--mock-data", "--vocab-size", "128"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain_moc.py: error: --global-batch-size 4 is not divisible") and "usage" not in err
