"""Training a sentencepiece BPE tokenizer with byte fallback from jsonl.

The model is lossless: identity normalization, no dummy prefix, extra whitespace kept, and byte fallback
for every character outside the vocabulary, so ``detokenize(tokenize(text)) == text`` for any text.
Ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos = eod), 3 ``<pad>``, then the default chat template's
markers (:data:`moc_megatron.data.chat.DEFAULT_CHAT_SYMBOLS`) as single tokens, then 256 byte pieces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from moc_megatron.data.chat import DEFAULT_CHAT_SYMBOLS
from moc_megatron.data.jsonl import iter_texts

# sentencepiece skips longer training sentences; documents are fed line by line anyway.
MAX_SENTENCE_BYTES = 16384


def iter_training_lines(paths: Sequence[str], key: str, max_lines: int, max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, in input order, up to ``max_lines`` lines or ``max_bytes`` bytes."""
    lines = size = 0
    for text in iter_texts(paths, key):
        for line in text.split("\n"):
            if not line.strip():
                continue
            yield line
            lines += 1
            size += len(line)
            if lines >= max_lines or size >= max_bytes:
                return


def train_sentencepiece(
    paths: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    json_key: str = "text",
    max_lines: int = 2_000_000,
    max_bytes: int = 200 << 20,
    num_threads: int | None = None,
    extra_symbols: Sequence[str] = (),
    character_coverage: float = 0.9995,
) -> str:
    """Train a BPE model and write ``{model_prefix}.model`` and ``.vocab``; returns the ``.model`` path.

    Training is deterministic for the same input and options (the first ``max_lines`` lines are used).
    """
    import sentencepiece

    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    symbols = list(dict.fromkeys([*DEFAULT_CHAT_SYMBOLS, *extra_symbols]))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter_training_lines(paths, json_key, max_lines, max_bytes),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=symbols,
        num_threads=num_threads or len(os.sched_getaffinity(0)),
        minloglevel=2,
    )
    return model_prefix + ".model"
