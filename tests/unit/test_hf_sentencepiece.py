"""A sentencepiece model becomes a tokenizer.json that encodes and decodes exactly like it, for every normaliser
setting (nmt_nfkc, nfkc, identity; remove_extra_whitespaces, add_dummy_prefix on and off), byte fallback, digit
splitting and user-defined symbols, BPE and unigram; a model whose conversion still differs is refused, naming
the setting. The models are trained here, tiny (a fraction of a second each)."""

from __future__ import annotations

import itertools
import random

import pytest

pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

from moc_megatron.hf.sp_convert import (  # noqa: E402
    SAMPLES,
    ConversionError,
    check_conversion,
    sentencepiece_to_tokenizers,
)

USER = ["<|im_start|>", "<|im_end|>", "[MASK]"]
# Every setting on and off with each model type and normaliser (a covering set of the 2x3x2x2x2x2x2 grid).
GRID = list(itertools.product(["bpe", "unigram"], ["nmt_nfkc", "nfkc", "identity"], [True, False], [True, False]))
CASES = [(mt, norm, rew, dummy, i % 2 == 0, i % 3 == 0, i % 4 < 2) for i, (mt, norm, rew, dummy) in enumerate(GRID)]


def _ids(case) -> str:
    mt, norm, rew, dummy, bf, digits, user = case
    return f"{mt}-{norm}-rew{int(rew)}-dummy{int(dummy)}-bytes{int(bf)}-digits{int(digits)}-user{int(user)}"


def train(tmp_path, texts, name="m", vocab_size=600, **options) -> str:
    """A sentencepiece model trained on ``texts``; ``options`` are sentencepiece's trainer flags."""
    prefix = str(tmp_path / name)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1, **options)
    return prefix + ".model"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_conversion_encodes_and_decodes_like_sentencepiece(tmp_path, tiny_texts, case):
    mt, norm, rew, dummy, bf, digits, user = case
    path = train(tmp_path, tiny_texts, model_type=mt, normalization_rule_name=norm, remove_extra_whitespaces=rew,
                 add_dummy_prefix=dummy, byte_fallback=bf, split_digits=digits,
                 user_defined_symbols=USER if user else [])
    fast = sentencepiece_to_tokenizers(path)
    check_conversion(path, fast, tiny_texts[:20])  # raises on any difference
    sp = spm.SentencePieceProcessor(model_file=path)
    text = "  def f(x):\n\treturn x ** 2  # 42, 3.14\n"  # indentation, a tab, digits
    assert fast.encode(text).ids == sp.encode(text)
    if rew and dummy:  # sentencepiece's defaults: the stripped text still gets its dummy prefix
        assert fast.encode(text).tokens[0].startswith("▁")


FUZZ_ALPHABET = [*"abcdefghij ABC  \t\n\r0123456789.,!?-", "\r\n", "😀", "東", "é", "e\u0301", "ＡＢ", "ﬁ", "①",
                 "\u00a0", "\u3000", "\u200b", "\x01", "ꙮ", *USER]


@pytest.mark.parametrize("mt,norm", [("bpe", "nmt_nfkc"), ("unigram", "identity")])
def test_random_text_round_trips_like_sentencepiece(tmp_path, tiny_texts, mt, norm):
    """Random strings of spaces, tabs, CR/LF, digits, emoji, compatibility and unknown characters and user-defined
    symbols (sentencepiece's defaults otherwise): same ids, same decoded text."""
    path = train(tmp_path, tiny_texts, model_type=mt, normalization_rule_name=norm, byte_fallback=True,
                 user_defined_symbols=USER)
    fast, sp = sentencepiece_to_tokenizers(path), spm.SentencePieceProcessor(model_file=path)
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 30)))
        ids = sp.encode(text)
        assert fast.encode(text).ids == ids, text
        assert fast.decode(ids) == sp.decode(ids), text


def test_a_conversion_that_differs_is_refused_naming_the_setting(tmp_path, tiny_texts):
    """A custom normalisation rule (e -> E) also rewrites the first character of e + combining accent in
    sentencepiece, but tokenizers' Precompiled maps the whole cluster by its first character: refused."""
    rule = tmp_path / "rule.tsv"
    rule.write_text("65\t45\n")
    path = train(tmp_path, tiny_texts, model_type="bpe", normalization_rule_tsv=str(rule))
    with pytest.raises(ConversionError, match="normalization 'user_defined' .* is not converted exactly"):
        check_conversion(path, sentencepiece_to_tokenizers(path))
    assert any("e\u0301" in s for s in SAMPLES)
    char = train(tmp_path, tiny_texts, name="char", vocab_size=200, model_type="char")
    with pytest.raises(ConversionError, match="model type char is not supported"):
        sentencepiece_to_tokenizers(char)


def test_exported_tokenizer_loads_in_transformers_and_matches(tmp_path, tiny_texts):
    """The saved tokenizer.json, loaded by transformers' AutoTokenizer, encodes and decodes as sentencepiece."""
    transformers = pytest.importorskip("transformers")
    path = train(tmp_path, tiny_texts, model_type="bpe", byte_fallback=True)  # BPE with byte fallback
    fast = sentencepiece_to_tokenizers(path)
    folder = tmp_path / "tok"
    folder.mkdir()
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    sp = spm.SentencePieceProcessor(model_file=path)
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
