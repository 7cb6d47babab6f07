"""Chat SFT preprocessing: ``{"messages": [...]}`` jsonl to token ids and assistant masks in indexed datasets.

Outputs (all moved into place only on success):

- ``{prefix}_tokens.bin/.idx``: token ids. Each Megatron *document* is one training sample; its
  *sequences* are the conversations in it (one per sample, or several with ``pack_length``). So the
  conversation boundaries are the index's sequence lengths, and ``IndexedDataset.document_indices``
  tells which conversations share a sample.
- ``{prefix}_loss_mask.bin/.idx``: uint8, the same layout; 1 exactly on tokens of assistant turns.
- ``{prefix}_meta.json``: tokenizer, template, pad/eod ids, pack length and counts.
- ``{prefix}_tokens.tokenizer.json``: the tokenizer record (:mod:`moc_megatron.data.tokenizer_record`).

Each conversation ends with the ``eod`` token (mask 0), unless the template already ended it with it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field

import numpy as np

from moc_megatron.data import indexed
from moc_megatron.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, encode_chat, validate_messages
from moc_megatron.data.jsonl import (
    BadLine,
    BadLineLog,
    Segment,
    check_encodable,
    expand_inputs,
    iter_chunks,
    parse_object,
)
from moc_megatron.data.packing import FirstFitPacker
from moc_megatron.data.pool import ordered_map
from moc_megatron.data.progress import Progress
from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer
from moc_megatron.data.tokenizer_record import dataset_record_path, record_from_tokenizer, write_record_file
from moc_megatron.data.tool_runner import RunStats

SFT_FORMAT = "moc-sft-v1"


@dataclass
class SFTConfig:
    """Options of ``tools/preprocess_sft.py``."""

    input: str
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    messages_key: str = "messages"
    chat_template: str = "auto"
    """``auto`` (the tokenizer's, else the default), ``default``, or a path to a Jinja template file."""
    pack_length: int | None = None
    workers: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20
    progress: bool = True
    max_open_samples: int = 64


@dataclass
class SFTStats(RunStats):
    """Counts of one SFT preprocessing run."""

    conversations: int = 0
    """Conversations written."""
    samples: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    dropped_too_long: int = 0
    """Conversations longer than ``pack_length`` (packing never splits one)."""
    dropped_no_assistant: int = 0
    """Conversations without any assistant token: nothing to learn from."""

    def packing_efficiency(self, pack_length: int | None) -> float:
        """Fraction of sample slots holding tokens (1.0 without packing)."""
        if not pack_length or not self.samples:
            return 1.0
        return self.tokens / (self.samples * pack_length)


def resolve_template(choice: str) -> tuple[str | None, str]:
    """``(template or None for the tokenizer's own, name for the metadata)`` of a ``--chat-template`` value."""
    if choice == "auto":
        return None, "auto"
    if choice == "default":
        return DEFAULT_CHAT_TEMPLATE, "default"
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"--chat-template must be 'auto', 'default' or a template file; {choice!r} is none")
    with open(choice, encoding="utf-8") as f:
        return f.read(), os.path.abspath(choice)


@dataclass
class SFTChunkResult:
    """Per chunk: concatenated conversations, their masks and lengths, and what was skipped."""

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    blank: int = 0
    no_assistant: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    nbytes: int = 0


class ConversationEncoder:
    """Parses and encodes chat lines (runs in pool workers)."""

    def __init__(self, tokenizer: MoCTokenizer, template: str | None, key: str, dtype: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.key = key
        self.dtype = np.dtype(dtype)

    def encode_line(self, raw: bytes) -> tuple[list[int], list[int]] | None:
        """``(ids, mask)`` of one line, ``None`` if blank; :class:`BadLine` when unusable."""
        obj = parse_object(raw)
        if obj is None:
            return None
        if self.key not in obj:
            raise BadLine(f"missing key {self.key!r}")
        try:
            messages = validate_messages(obj[self.key])
        except ValueError as exc:
            raise BadLine(str(exc)) from None
        try:
            ids, mask = encode_chat(self.tokenizer, messages, template=self.template)
        except ChatTemplateError as exc:
            raise BadLine(str(exc)) from None
        except Exception as exc:
            for m in messages:
                check_encodable(m["content"], "content")
            raise BadLine(f"tokenizer failed: {type(exc).__name__}: {exc}") from None
        if not ids or ids[-1] != self.tokenizer.eod:
            ids.append(self.tokenizer.eod)
            mask.append(0)
        return ids, mask

    def encode(self, data: bytes, stop_at_first_bad: bool) -> SFTChunkResult:
        """Encode the lines of ``data`` (which ends with a newline)."""
        lines = data.split(b"\n")
        lines.pop()
        flat_ids: list[int] = []
        flat_mask: list[int] = []
        lengths: list[int] = []
        result = SFTChunkResult(np.empty(0), np.empty(0), np.empty(0), nbytes=len(data))
        for i, raw in enumerate(lines):
            try:
                encoded = self.encode_line(raw)
            except BadLine as exc:
                result.bad.append((i, exc.reason))
                if stop_at_first_bad:
                    break
                continue
            if encoded is None:
                result.blank += 1
                continue
            ids, mask = encoded
            if not any(mask):
                result.no_assistant += 1
                continue
            flat_ids.extend(ids)
            flat_mask.extend(mask)
            lengths.append(len(ids))
        result.tokens = np.array(flat_ids, dtype=self.dtype)
        result.mask = np.array(flat_mask, dtype=np.uint8)
        result.lengths = np.array(lengths, dtype=np.int64)
        return result


_ENCODER: ConversationEncoder | None = None


def init_worker(tokenizer_type: str, tokenizer_model: str, template: str | None, key: str, dtype: str) -> None:
    """Pool initializer: load the tokenizer once per worker."""
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # see moc_megatron.data.encode.init_worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = ConversationEncoder(build_tokenizer(tokenizer_type, tokenizer_model), template, key, dtype)


def encode_chunk(data: bytes, stop_at_first_bad: bool) -> SFTChunkResult:
    """Pool task: encode one chunk of chat lines."""
    assert _ENCODER is not None, "init_worker was not called"
    return _ENCODER.encode(data, stop_at_first_bad)


class _SampleWriter:
    """Writes samples (lists of conversations) to the tokens and loss-mask datasets."""

    def __init__(self, tokens_prefix: str, mask_prefix: str, dtype: str, stats: SFTStats) -> None:
        self.tokens_prefix, self.mask_prefix = tokens_prefix, mask_prefix
        self.tokens = indexed.open_builder(tokens_prefix + ".bin", dtype)
        self.mask = indexed.open_builder(mask_prefix + ".bin", np.uint8)
        self.stats = stats

    def write(self, conversations: list[tuple[np.ndarray, np.ndarray]]) -> None:
        lengths = [len(t) for t, _ in conversations]
        self.tokens.add_document(np.concatenate([t for t, _ in conversations]), lengths)
        self.mask.add_document(np.concatenate([m for _, m in conversations]), lengths)
        self.stats.samples += 1
        self.stats.conversations += len(conversations)
        self.stats.tokens += sum(lengths)
        self.stats.assistant_tokens += int(sum(int(m.sum()) for _, m in conversations))

    def finalize(self) -> None:
        indexed.finalize(self.tokens, self.tokens_prefix)
        indexed.finalize(self.mask, self.mask_prefix)


def _pack_and_write(
    config: SFTConfig,
    segments: list[Segment],
    template: str | None,
    dtype: str,
    staged: indexed.StagedOutputs,
    stats: SFTStats,
    progress: Progress,
) -> None:
    """Encode conversations with the worker pool, pack them (optionally) and write the samples in order."""
    bad = BadLineLog(segments, config.skip_bad_lines)
    stop = not config.skip_bad_lines
    packer = FirstFitPacker(config.pack_length, config.max_open_samples) if config.pack_length else None
    held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    next_id = 0
    tokens_prefix = staged.stage_dataset(f"{config.output_prefix}_tokens")
    mask_prefix = staged.stage_dataset(f"{config.output_prefix}_loss_mask")
    writer = indexed.LazyWriter(lambda: _SampleWriter(tokens_prefix, mask_prefix, dtype, stats))

    def emit(sample: list[tuple[np.ndarray, np.ndarray]]) -> None:
        writer.submit(lambda w: w.write(sample))

    tasks = ((item, (item[0].data, stop)) for item in iter_chunks(segments, config.chunk_bytes))
    initargs = (config.tokenizer_type, config.tokenizer_model, template, config.messages_key, dtype)
    results = ordered_map(encode_chunk, tasks, config.workers, init_worker, initargs, on_start=writer.start_import)
    with closing(results):
        for (chunk, disk_bytes), result in results:
            for line_in_chunk, reason in result.bad:
                bad.report(chunk, line_in_chunk, reason)
            offset = 0
            for length in result.lengths.tolist():
                conv = (result.tokens[offset : offset + length], result.mask[offset : offset + length])
                offset += length
                if packer is None:
                    emit([conv])
                elif length > packer.capacity:
                    stats.dropped_too_long += 1
                else:
                    held[next_id] = conv
                    for sample in packer.add(next_id, length):
                        emit([held.pop(i) for i in sample])
                    next_id += 1
            stats.blank_lines += result.blank
            stats.dropped_no_assistant += result.no_assistant
            stats.input_bytes += result.nbytes
            progress.update(len(result.lengths), int(result.tokens.size), disk_bytes)
    for sample in packer.flush() if packer is not None else []:
        emit([held.pop(i) for i in sample])
    writer.close().finalize()
    stats.bad_lines, stats.bad_examples = bad.count, bad.examples


def preprocess_sft(config: SFTConfig) -> SFTStats:
    """Run the SFT preprocessing; outputs appear only if it succeeds (raises ``BadInputError`` otherwise)."""
    if config.workers < 1:
        raise ValueError("--workers must be >= 1")
    if config.pack_length is not None and config.pack_length < 2:
        raise ValueError("--pack-length must be >= 2")
    start = time.perf_counter()
    paths = expand_inputs(config.input)
    template, template_name = resolve_template(config.chat_template)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    if template_name == "auto":
        template_name = "tokenizer" if tokenizer.has_chat_template else "default"
    dtype = indexed.optimal_dtype(tokenizer.vocab_size).__name__
    stats = SFTStats()
    total_bytes = sum(os.path.getsize(p) for p in paths)
    progress = Progress(total_bytes, config.log_interval, config.progress, desc="sft", unit="conversations")
    try:
        with indexed.StagedOutputs(config.output_prefix) as staged:
            _pack_and_write(config, [Segment(p) for p in paths], template, dtype, staged, stats, progress)
            if not stats.samples:
                raise ValueError(
                    f"no conversation to write ({stats.dropped_too_long} too long, {stats.dropped_no_assistant} "
                    f"without assistant tokens, {stats.bad_lines} bad lines skipped): nothing was written"
                )
            meta = {
                "format": SFT_FORMAT,
                "tokenizer_type": config.tokenizer_type,
                "tokenizer_model": os.path.abspath(config.tokenizer_model),
                "chat_template": template_name,
                "eod": tokenizer.eod,
                "pad": tokenizer.pad,
                "pack_length": config.pack_length,
                "stats": {k: v for k, v in asdict(stats).items() if k not in ("outputs", "bad_examples", "seconds")},
            }
            with open(staged.stage(f"{config.output_prefix}_meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
            record = record_from_tokenizer(tokenizer, config.tokenizer_type, config.tokenizer_model)
            write_record_file(staged.stage(dataset_record_path(f"{config.output_prefix}_tokens")), record)
            stats.outputs = staged.commit()
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - start
    return stats
