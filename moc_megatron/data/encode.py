"""Worker side of ``tools/preprocess_data.py``: one chunk of jsonl lines to token arrays.

Runs in pool worker processes. A chunk is whole lines of bytes; the result holds, per JSON key, the
concatenated token ids of the chunk's documents and their lengths, plus the lines that were bad.
A bad line is dropped from every key, so the keys' datasets stay aligned.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import numpy as np

from moc_megatron.data.jsonl import BadLine, check_encodable, get_text, parse_object
from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer


@dataclass
class ChunkResult:
    """What a worker returns for one chunk."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    documents: int = 0
    """Good (non-blank, non-bad) lines."""
    blank: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    """Documents per key dropped because they have no tokens."""
    bad: list[tuple[int, str]] = field(default_factory=list)
    """``(0-based line within the chunk, reason)``, in line order."""
    nbytes: int = 0


class ChunkEncoder:
    """Parses, validates and tokenizes chunks of jsonl lines."""

    def __init__(self, tokenizer: MoCTokenizer, keys: tuple[str, ...], append_eod: bool, dtype: str) -> None:
        self.tokenizer = tokenizer
        self.keys = keys
        self.append_eod = append_eod
        self.dtype = np.dtype(dtype)

    def _tokenize_key(self, texts: list[str], key: str, bad_rows: dict[int, str]) -> list[list[int]]:
        try:
            return self.tokenizer.tokenize_batch(texts)
        except Exception:
            pass  # find the culprits one text at a time (rare path)
        out: list[list[int]] = []
        for row, text in enumerate(texts):
            try:
                check_encodable(text, key)
                out.append(self.tokenizer.tokenize(text))
            except BadLine as exc:
                bad_rows.setdefault(row, exc.reason)
                out.append([])
            except Exception as exc:
                bad_rows.setdefault(row, f"tokenizer failed on key {key!r}: {type(exc).__name__}: {exc}")
                out.append([])
        return out

    def encode(self, data: bytes, stop_at_first_bad: bool = False) -> ChunkResult:
        """Encode the lines of ``data`` (which ends with a newline)."""
        lines = data.split(b"\n")
        lines.pop()
        texts: dict[str, list[str]] = {k: [] for k in self.keys}
        rows_to_line: list[int] = []
        result = ChunkResult(tokens={}, lengths={}, nbytes=len(data))
        for i, raw in enumerate(lines):
            try:
                obj = parse_object(raw)
                if obj is None:
                    result.blank += 1
                    continue
                values = [get_text(obj, k) for k in self.keys]
            except BadLine as exc:
                result.bad.append((i, exc.reason))
                if stop_at_first_bad:
                    break
                continue
            for k, v in zip(self.keys, values):
                texts[k].append(v)
            rows_to_line.append(i)

        bad_rows: dict[int, str] = {}
        ids = {k: self._tokenize_key(texts[k], k, bad_rows) for k in self.keys}
        if bad_rows:
            result.bad.extend((rows_to_line[r], reason) for r, reason in bad_rows.items())
            result.bad.sort()
        eod = [self.tokenizer.eod] if self.append_eod else []
        for k in self.keys:
            flat: list[int] = []
            lengths: list[int] = []
            empty = 0
            for row, doc in enumerate(ids[k]):
                if bad_rows and row in bad_rows:
                    continue
                if not doc:
                    empty += 1
                    continue
                flat.extend(doc)
                flat.extend(eod)
                lengths.append(len(doc) + len(eod))
            result.tokens[k] = np.array(flat, dtype=self.dtype)
            result.lengths[k] = np.array(lengths, dtype=np.int64)
            result.empty[k] = empty
        result.documents = len(rows_to_line) - len(bad_rows)
        return result


_ENCODER: ChunkEncoder | None = None


def init_worker(tokenizer_type: str, tokenizer_model: str, keys: tuple[str, ...], append_eod: bool, dtype: str) -> None:
    """Pool initializer: load the tokenizer once per worker."""
    global _ENCODER
    # The parent handles Ctrl-C. SIGTERM (Pool.terminate) must kill at once: a Python-level handler inherited
    # from the tool can miss a signal that lands just before the worker blocks on the task queue's lock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
    _ENCODER = ChunkEncoder(build_tokenizer(tokenizer_type, tokenizer_model), keys, append_eod, dtype)


def encode_chunk(data: bytes, stop_at_first_bad: bool) -> ChunkResult:
    """Pool task: encode one chunk with the worker's encoder."""
    assert _ENCODER is not None, "init_worker was not called"
    return _ENCODER.encode(data, stop_at_first_bad)
