"""One tokenizer from data to checkpoint: a small record of the tokenizer, stored with what it made.

A :class:`TokenizerRecord` holds the tokenizer type, its vocabulary size, its end-of-document and padding
ids and the SHA-256 of its model file (the sentencepiece ``.model``, or a Hugging Face ``tokenizer.json``).
It is written

- beside a preprocessed dataset: ``{prefix}.tokenizer.json`` next to ``{prefix}.bin/.idx``
  (``tools/preprocess_data.py`` and, for ``{prefix}_tokens``, ``tools/preprocess_sft.py``);
- into a checkpoint's common state under the key :data:`CHECKPOINT_KEY` (``pretrain_moc.py``/
  ``finetune_moc.py`` saves).

Whoever consumes data or a checkpoint builds the record of its own tokenizer and calls
:func:`check_same_tokenizer`, which raises :class:`TokenizerMismatchError` naming both sources and the
fields that differ. The model file's path is kept for the message only: the same file moved elsewhere
is still the same tokenizer, a different file with the same vocabulary size is not.

Public API::

    record = record_for(tokenizer_type, tokenizer_model)      # or record_from_tokenizer(tok, type, model)
    write_dataset_record(prefix, record); read_dataset_record(prefix) -> TokenizerRecord | None
    state[CHECKPOINT_KEY] = record.to_dict(); record_from_checkpoint_state(common) -> TokenizerRecord | None
    record_from_checkpoint("ckpt/iter_0000200") -> TokenizerRecord | None
    check_same_tokenizer(expected, expected_source, found, found_source)   # raises TokenizerMismatchError
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from moc_megatron.errors import MoCError

RECORD_SUFFIX = ".tokenizer.json"
CHECKPOINT_KEY = "tokenizer"
RECORD_FORMAT = "moc-tokenizer-v1"

# Fields that must agree; model_path is informational.
COMPARED_FIELDS = ("tokenizer_type", "vocab_size", "model_sha256", "eod", "pad")


class TokenizerMismatchError(MoCError, ValueError):
    """Two things that must share one tokenizer (data, checkpoint, the run's flags) do not."""


@dataclass(frozen=True)
class TokenizerRecord:
    """What identifies a tokenizer: type, vocabulary size, special ids and the hash of its model file."""

    tokenizer_type: str
    vocab_size: int
    model_sha256: str
    eod: int
    pad: int
    model_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with a ``format`` tag)."""
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerRecord:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed record."""
        try:
            return cls(str(data["tokenizer_type"]), int(data["vocab_size"]), str(data["model_sha256"]),
                       int(data["eod"]), int(data["pad"]), str(data.get("model_path", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed tokenizer record {data!r}: {exc}") from exc

    def describe(self) -> str:
        """``SentencePieceTokenizer, 4096 tokens, sha256 1a2b3c4d5e6f (data/tokenizer.model)``."""
        where = f" ({self.model_path})" if self.model_path else ""
        return f"{self.tokenizer_type}, {self.vocab_size} tokens, sha256 {self.model_sha256[:12]}{where}"


def model_file(tokenizer_type: str, tokenizer_model: str) -> str:
    """The file whose bytes define the tokenizer: the ``.model`` file, or a folder's ``tokenizer.json``."""
    if tokenizer_type == "HuggingFaceTokenizer" and os.path.isdir(tokenizer_model):
        return os.path.join(tokenizer_model, "tokenizer.json")
    return tokenizer_model


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_from_tokenizer(tokenizer: Any, tokenizer_type: str, tokenizer_model: str) -> TokenizerRecord:
    """The record of a loaded ``MoCTokenizer`` built from ``(tokenizer_type, tokenizer_model)``."""
    path = model_file(tokenizer_type, tokenizer_model)
    return TokenizerRecord(tokenizer_type, int(tokenizer.vocab_size), file_sha256(path),
                           int(tokenizer.eod), int(tokenizer.pad), os.path.abspath(path))


def record_for(tokenizer_type: str, tokenizer_model: str) -> TokenizerRecord:
    """Load the tokenizer and return its record."""
    from moc_megatron.data.tokenizer import build_tokenizer

    return record_from_tokenizer(build_tokenizer(tokenizer_type, tokenizer_model), tokenizer_type, tokenizer_model)


def dataset_record_path(prefix: str) -> str:
    """``{prefix}.tokenizer.json``, beside ``{prefix}.idx``."""
    return prefix + RECORD_SUFFIX


def write_record_file(path: str, record: TokenizerRecord) -> None:
    """Write ``record`` as JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record.to_dict(), f, indent=2)
        f.write("\n")


def write_dataset_record(prefix: str, record: TokenizerRecord) -> str:
    """Write ``{prefix}.tokenizer.json``; return its path."""
    path = dataset_record_path(prefix)
    write_record_file(path, record)
    return path


def read_dataset_record(prefix: str) -> TokenizerRecord | None:
    """The record beside ``{prefix}.idx``, or ``None`` if the dataset has none (made before records existed)."""
    path = dataset_record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return TokenizerRecord.from_dict(json.load(f))
    except (OSError, ValueError) as exc:
        raise TokenizerMismatchError(f"{path}: unreadable tokenizer record ({exc})") from exc


def record_from_checkpoint_state(common: dict[str, Any]) -> TokenizerRecord | None:
    """The record in a checkpoint's common state dict (``platform.megatron_versions.read_common_state``)."""
    data = common.get(CHECKPOINT_KEY)
    return None if data is None else TokenizerRecord.from_dict(data)


def record_from_checkpoint(path: str) -> TokenizerRecord | None:
    """The record stored in a saved checkpoint folder (an ``iter_XXXXXXX`` folder), or ``None``."""
    from moc_megatron.platform.megatron_versions import read_common_state

    return record_from_checkpoint_state(read_common_state(path))


def tokenizer_differences(expected: TokenizerRecord, found: TokenizerRecord) -> list[str]:
    """``field: expected X, found Y`` for each compared field that differs."""
    return [f"{name}: {getattr(expected, name)!r} vs {getattr(found, name)!r}"
            for name in COMPARED_FIELDS if getattr(expected, name) != getattr(found, name)]


def check_same_tokenizer(expected: TokenizerRecord, expected_source: str,
                         found: TokenizerRecord | None, found_source: str) -> None:
    """Raise :class:`TokenizerMismatchError` if ``found`` is not ``expected``'s tokenizer.

    ``*_source`` name where each record comes from (a file, ``--tokenizer-model X``, a checkpoint folder);
    the message names both. ``found=None`` (no record) passes: there is nothing to compare with.
    """
    if found is None:
        return
    diffs = tokenizer_differences(expected, found)
    if diffs:
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {found_source} was made with {found.describe()}, but {expected_source} is "
            f"{expected.describe()} (differs in {'; '.join(diffs)}); use the tokenizer the data and "
            "checkpoint were made with")
