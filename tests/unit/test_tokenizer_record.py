"""One tokenizer from data to checkpoint: records beside datasets and in checkpoints, refused mismatches.

Two sentencepiece models of the same vocabulary size (512) trained on different halves of the tiny
corpus stand in for the README's case: a quick-start checkpoint finetuned on data made with another
tokenizer of the same size.
"""

from __future__ import annotations

import json

import pytest

from moc_megatron.checkpoint.layout import checkpoint_path
from moc_megatron.data.tokenizer_record import (
    CHECKPOINT_KEY,
    TokenizerMismatchError,
    TokenizerRecord,
    check_same_tokenizer,
    dataset_record_path,
    read_dataset_record,
    record_for,
    record_from_checkpoint,
)
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.finetune import finetune, parse_finetune_run_config
from moc_megatron.training.loop import pretrain


@pytest.fixture(scope="module")
def other_sp_model(tmp_path_factory, tiny_texts) -> str:
    """A second 512-piece sentencepiece model, trained on other documents: same size, other tokenizer."""
    from moc_megatron.data.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("sp_other")
    corpus = root / "half.jsonl"
    with open(corpus, "w") as f:
        for text in tiny_texts[1::2] * 2:
            f.write(json.dumps({"text": text}) + "\n")
    return train_sentencepiece([str(corpus)], str(root / "other"), vocab_size=512, num_threads=1)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_corpus, sp_model, run_tool):
    """Pretraining and SFT data made with ``sp_model``."""
    from moc_megatron.data.synthetic_corpus import generate_people, synthetic_chats

    root = tmp_path_factory.mktemp("records")
    assert run_tool("preprocess_data", "--input", tiny_corpus, "--output-prefix", root / "corpus",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--append-eod", "--no-progress") == 0
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for conv in synthetic_chats(generate_people(10, seed=3), 40, seed=3):
            f.write(json.dumps(conv) + "\n")
    assert run_tool("preprocess_sft", "--input", chats, "--output-prefix", root / "chat",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--pack-length", 64, "--no-progress") == 0
    return root


def model_args(sp: str, *extra: str) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp,
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
            "--eval-iters", "0", "--num-workers", "0", "--log-interval", "1", *extra]


def test_other_tokenizer_of_same_size_has_another_record(sp_model, other_sp_model):
    a, b = record_for("SentencePieceTokenizer", sp_model), record_for("SentencePieceTokenizer", other_sp_model)
    assert a.vocab_size == b.vocab_size == 512 and a.model_sha256 != b.model_sha256
    assert TokenizerRecord.from_dict(a.to_dict()) == a
    check_same_tokenizer(a, "x", a, "y")
    check_same_tokenizer(a, "x", None, "a dataset without a record")
    with pytest.raises(TokenizerMismatchError, match="model_sha256"):
        check_same_tokenizer(a, "--tokenizer-model A", b, "dataset B")


def test_preprocessing_records_the_tokenizer_beside_the_idx(datasets, sp_model, hf_tokenizer_dir, tiny_corpus,
                                                            tmp_path, run_tool):
    expected = record_for("SentencePieceTokenizer", sp_model)
    assert read_dataset_record(str(datasets / "corpus_text_document")) == expected
    assert read_dataset_record(str(datasets / "chat_tokens")) == expected
    assert (datasets / "corpus_text_document.tokenizer.json").is_file()
    # a Hugging Face folder is identified by its tokenizer.json
    assert run_tool("preprocess_data", "--input", tiny_corpus, "--output-prefix", tmp_path / "hf",
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir,
                    "--no-progress") == 0
    hf = read_dataset_record(str(tmp_path / "hf_text_document"))
    assert hf == record_for("HuggingFaceTokenizer", hf_tokenizer_dir) and hf.vocab_size == 600
    assert hf.model_path.endswith("tokenizer.json")


def test_pretraining_on_data_of_another_tokenizer_stops_naming_the_dataset(datasets, other_sp_model):
    prefix = str(datasets / "corpus_text_document")
    args = parse_run_config(model_args(other_sp_model, "--data-path", prefix, "--split", "90,10,0"),
                      world_size=1, exit_on_error=False)
    with pytest.raises(TokenizerMismatchError, match=f"dataset {prefix}.idx was made with .*{other_sp_model}"):
        pretrain(args)


def test_checkpoint_records_its_tokenizer_and_refuses_another(tmp_path, datasets, sp_model, other_sp_model):
    """The README's case: a checkpoint made with tokenizer A finetuned on data and flags of tokenizer B."""
    from megatron.core import dist_checkpointing

    save = str(tmp_path / "pre")
    pretrain(parse_run_config(model_args(sp_model, "--mock-data", "--save", save), world_size=1, exit_on_error=False))
    common = dist_checkpointing.load_common_state_dict(checkpoint_path(save, 2))
    assert TokenizerRecord.from_dict(common[CHECKPOINT_KEY]) == record_for("SentencePieceTokenizer", sp_model)
    assert record_from_checkpoint(checkpoint_path(save, 2)) == record_for("SentencePieceTokenizer", sp_model)

    # SFT data made with B, run with B: the data agree, the checkpoint does not
    other_data = tmp_path / "chat_b"
    for suffix in (".bin", ".idx"):
        for name in ("tokens", "loss_mask"):
            (tmp_path / f"chat_b_{name}{suffix}").write_bytes((datasets / f"chat_{name}{suffix}").read_bytes())
    record_b = record_for("SentencePieceTokenizer", other_sp_model)
    with open(dataset_record_path(f"{other_data}_tokens"), "w") as f:
        json.dump(record_b.to_dict(), f)
    args = parse_finetune_run_config(model_args(other_sp_model, "--sft-data-path", str(other_data), "--split",
                                                "90,10,0", "--pretrained-checkpoint", save),
                                     world_size=1, exit_on_error=False)
    with pytest.raises(TokenizerMismatchError, match=f"checkpoint {save}/iter_0000002 was made with .*{sp_model}"):
        finetune(args)
    # and the SFT data of A with the flags of B stops at the data, before any model is built
    args = parse_finetune_run_config(model_args(other_sp_model, "--sft-data-path", str(datasets / "chat"),
                                                "--split", "90,10,0", "--pretrained-checkpoint", save),
                                     world_size=1, exit_on_error=False)
    with pytest.raises(TokenizerMismatchError, match="chat_tokens.idx"):
        finetune(args)
