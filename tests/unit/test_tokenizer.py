"""MoCTokenizer over sentencepiece and Hugging Face tokenizers, and tools/train_tokenizer.py."""

from __future__ import annotations

import json

import pytest

from moc_megatron.data.chat import DEFAULT_CHAT_SYMBOLS, DEFAULT_CHAT_TEMPLATE, render_chat
from moc_megatron.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where was Ada born?"},
    {"role": "assistant", "content": "In Lisbon."},
]


def test_sentencepiece_ids_and_sizes(sp_model: str) -> None:
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 512
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, 3)
    assert not tok.has_chat_template
    for symbol in DEFAULT_CHAT_SYMBOLS:
        assert len(tok.tokenize(symbol)) == 1, symbol


def test_sentencepiece_is_lossless(sp_model: str, tricky_texts: list[str]) -> None:
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    for text in tricky_texts + ["", " ", "\n"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text


def test_tokenize_batch_matches_tokenize(sp_model: str, hf_tokenizer_dir: str, tricky_texts: list[str]) -> None:
    sp = build_tokenizer("SentencePieceTokenizer", sp_model)
    hf = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    for tok in (sp, hf):
        assert tok.tokenize_batch(tricky_texts) == [tok.tokenize(t) for t in tricky_texts]


def test_huggingface_folder(hf_tokenizer_dir: str, tricky_texts: list[str]) -> None:
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert isinstance(tok, HuggingFaceTokenizer)
    assert tok.vocab_size == 600
    assert tok.detokenize([tok.eod]) == "<|endoftext|>"
    assert tok.detokenize([tok.pad]) == "<pad>"
    assert tok.bos is None
    for text in tricky_texts:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.has_chat_template


def test_huggingface_tokenizer_json_path(hf_tokenizer_dir: str) -> None:
    tok = build_tokenizer("HuggingFaceTokenizer", f"{hf_tokenizer_dir}/tokenizer.json")
    assert tok.has_chat_template and tok.vocab_size == 600


def test_huggingface_never_downloads() -> None:
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        build_tokenizer("HuggingFaceTokenizer", "meta-llama/Llama-3.2-1B")


def test_huggingface_without_eos_is_refused(hf_tokenizer_dir: str, tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="end-of-document"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


def test_unknown_type_and_missing_model(sp_model: str) -> None:
    with pytest.raises(ValueError, match="SentencePieceTokenizer, HuggingFaceTokenizer"):
        build_tokenizer("GPT2BPETokenizer", sp_model)
    with pytest.raises(FileNotFoundError):
        build_tokenizer("SentencePieceTokenizer", sp_model + ".missing")


def test_sentencepiece_without_eos_is_refused(tmp_path, tiny_corpus) -> None:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=str(tiny_corpus), model_prefix=str(tmp_path / "noeos"), vocab_size=300, eos_id=-1, minloglevel=2
    )
    with pytest.raises(ValueError, match="no eos"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "noeos.model"))


def test_default_chat_template_text(sp_model: str) -> None:
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhere was Ada born?<|end|>\n<|assistant|>\nIn Lisbon.<|end|>\n"
    )
    assert render_chat(tok, CONVERSATION, template=DEFAULT_CHAT_TEMPLATE) == text
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert tok.detokenize(prompt).endswith("<|assistant|>\n")
    full = tok.apply_chat_template(CONVERSATION)
    assert full[: len(prompt)] == prompt  # a generation prompt is a prefix of the trained sequence


def test_huggingface_chat_template(hf_tokenizer_dir: str) -> None:
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhere was Ada born?<|im_end|>\n" in text
    assert tok.detokenize(tok.apply_chat_template(CONVERSATION)) == tok.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_huggingface_chat_template_jinja_file(hf_tokenizer_dir: str, tmp_path) -> None:
    import shutil

    folder = tmp_path / "with_jinja"
    shutil.copytree(hf_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not build_tokenizer("HuggingFaceTokenizer", str(folder)).has_chat_template
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    tok = build_tokenizer("HuggingFaceTokenizer", str(folder))
    assert tok.apply_chat_template(CONVERSATION[1:], tokenize=False) == "[user]Where was Ada born?[assistant]In Lisbon."


def test_train_tokenizer_tool(run_tool, tiny_corpus, tmp_path, tricky_texts: list[str]) -> None:
    prefix = tmp_path / "tok"
    assert run_tool("train_tokenizer", "--input", tiny_corpus, "--model-prefix", prefix, "--vocab-size", 400) == 0
    tok = build_tokenizer("SentencePieceTokenizer", f"{prefix}.model")
    assert tok.vocab_size == 400
    for text in tricky_texts:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_train_tokenizer_tool_reports_bad_line(run_tool, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert run_tool("train_tokenizer", "--input", bad, "--model-prefix", tmp_path / "t", "--vocab-size", 300) == 1
    assert f"{bad}:2: key 'text' holds a int" in capsys.readouterr().err
