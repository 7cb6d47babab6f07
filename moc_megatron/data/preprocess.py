"""Pretraining preprocessing: jsonl corpora to ``{prefix}_{key}_document.bin/.idx`` (Megatron-LM's layout).

The main process reads the input in chunks of whole lines and hands them to a pool of workers
(:mod:`moc_megatron.data.encode`); results come back in input order, whatever the worker count, and are
written with megatron-core's ``IndexedDatasetBuilder``. With ``partitions > 1`` the input is cut into that
many contiguous byte ranges, each processed by its own process with ``workers / partitions`` workers,
and the partial datasets are concatenated in order: the output is byte-identical to a 1-worker run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from functools import partial

from moc_megatron.data import indexed
from moc_megatron.data.encode import ChunkResult, encode_chunk, init_worker
from moc_megatron.data.jsonl import (
    MAX_BAD_EXAMPLES,
    BadInputError,
    BadLineLog,
    Segment,
    expand_inputs,
    iter_chunks,
    plan_partitions,
)
from moc_megatron.data.pool import ordered_map, worker_context
from moc_megatron.data.progress import Progress
from moc_megatron.data.tokenizer import build_tokenizer
from moc_megatron.data.tokenizer_record import dataset_record_path, record_from_tokenizer, write_record_file
from moc_megatron.data.tool_runner import RunStats


@dataclass
class PreprocessConfig:
    """Options of ``tools/preprocess_data.py`` (Megatron-LM's names)."""

    input: str
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20
    progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent options."""
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys has duplicates: {self.json_keys}")
        if self.workers < 1 or self.partitions < 1:
            raise ValueError("--workers and --partitions must be >= 1")
        if self.workers % self.partitions:
            raise ValueError(
                f"--workers ({self.workers}) must be a multiple of --partitions ({self.partitions}): "
                "each partition gets workers/partitions workers, as in Megatron-LM"
            )
        if self.chunk_bytes < 1:
            raise ValueError("--chunk-bytes must be >= 1")


@dataclass
class PreprocessStats(RunStats):
    """Counts of one run (or one partition)."""

    documents: int = 0
    """Input lines that became documents (blank and bad lines excluded)."""
    tokens: int = 0
    """Tokens written, all keys together."""
    empty_documents: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    """Documents written per key (``documents`` minus that key's empty documents)."""

    def add(self, other: PreprocessStats) -> None:
        """Accumulate another partition's counts."""
        self.documents += other.documents
        self.tokens += other.tokens
        self.input_bytes += other.input_bytes
        self.blank_lines += other.blank_lines
        self.bad_lines += other.bad_lines
        room = MAX_BAD_EXAMPLES - len(self.bad_examples)
        self.bad_examples.extend(other.bad_examples[: max(room, 0)])
        for k, v in other.empty_documents.items():
            self.empty_documents[k] = self.empty_documents.get(k, 0) + v
        for k, v in other.written.items():
            self.written[k] = self.written.get(k, 0) + v


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


ProgressFn = Callable[[int, int, int], None]


def _new_stats(keys: Sequence[str]) -> PreprocessStats:
    return PreprocessStats(empty_documents=dict.fromkeys(keys, 0), written=dict.fromkeys(keys, 0))


def _process_segments(
    config: PreprocessConfig,
    segments: Sequence[Segment],
    out_prefixes: dict[str, str],
    dtype: str,
    workers: int,
    on_progress: ProgressFn,
) -> PreprocessStats:
    """Encode ``segments`` with a pool of ``workers`` and write one dataset per key."""
    keys = tuple(config.json_keys)
    stats = _new_stats(keys)
    bad = BadLineLog(segments, config.skip_bad_lines)
    stop = not config.skip_bad_lines
    tasks = ((item, (item[0].data, stop)) for item in iter_chunks(segments, config.chunk_bytes))
    initargs = (config.tokenizer_type, config.tokenizer_model, keys, config.append_eod, dtype)
    writer = indexed.LazyWriter(lambda: {k: indexed.open_builder(p + ".bin", dtype) for k, p in out_prefixes.items()})

    def write(builders: dict, result: ChunkResult) -> None:
        for key in keys:
            indexed.add_documents(builders[key], result.tokens[key], result.lengths[key])

    with closing(
        ordered_map(encode_chunk, tasks, workers, init_worker, initargs, on_start=writer.start_import)
    ) as results:
        for (chunk, disk_bytes), result in results:
            for line_in_chunk, reason in result.bad:
                bad.report(chunk, line_in_chunk, reason)
            writer.submit(partial(write, result=result))
            chunk_tokens = 0
            for key in keys:
                chunk_tokens += result.tokens[key].size
                stats.written[key] += result.lengths[key].size
                stats.empty_documents[key] += result.empty[key]
            stats.documents += result.documents
            stats.tokens += chunk_tokens
            stats.blank_lines += result.blank
            stats.input_bytes += result.nbytes
            on_progress(result.documents, chunk_tokens, disk_bytes)
    builders = writer.close()
    for key, prefix in out_prefixes.items():
        indexed.finalize(builders[key], prefix)
    stats.bad_lines, stats.bad_examples = bad.count, bad.examples
    return stats


def _partition_main(
    config: PreprocessConfig,
    segments: list[Segment],
    out_prefixes: dict[str, str],
    dtype: str,
    stats_path: str,
    counters,
    index: int,
) -> None:
    """Entry point of a partition process: writes its result (or its error) as JSON to ``stats_path``."""
    # Terminated by the parent on failure: die at once (the pool's workers then see EOF and exit too).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_progress(docs: int, tokens: int, nbytes: int) -> None:
        counters[3 * index] += docs
        counters[3 * index + 1] += tokens
        counters[3 * index + 2] += nbytes

    try:
        workers = config.workers // config.partitions
        stats = _process_segments(config, segments, out_prefixes, dtype, workers, on_progress)
        report = {"ok": True, "stats": asdict(stats)}
    except BadInputError as exc:
        report = {"ok": False, "bad_input": True, "error": str(exc)}
    except Exception as exc:
        report = {"ok": False, "bad_input": False, "error": f"{type(exc).__name__}: {exc}"}
    with open(stats_path, "w") as f:
        json.dump(report, f)
    sys.exit(0 if report["ok"] else 1)


def _run_partitions(
    config: PreprocessConfig,
    plan: list[list[Segment]],
    staged: indexed.StagedOutputs,
    final_prefixes: dict[str, str],
    dtype: str,
    progress: Progress,
) -> PreprocessStats:
    ctx = worker_context()
    counters = ctx.Array("q", 3 * len(plan), lock=False)
    part_prefixes = [{k: staged.scratch(f"part{i}_{k}") for k in config.json_keys} for i in range(len(plan))]
    stats_paths = [staged.scratch(f"part{i}.json") for i in range(len(plan))]
    procs = [
        ctx.Process(
            target=_partition_main,
            args=(config, plan[i], part_prefixes[i], dtype, stats_paths[i], counters, i),
            name=f"preprocess-partition-{i}",
        )
        for i in range(len(plan))
    ]
    seen = [0, 0, 0]
    indexed.preload()  # once here rather than once per forked partition
    try:
        for p in procs:
            p.start()
        while True:
            totals = [sum(counters[j::3]) for j in range(3)]
            progress.update(*(t - s for t, s in zip(totals, seen)))
            seen = totals
            failed = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed or all(p.exitcode == 0 for p in procs):
                break
            time.sleep(0.1)
        if failed:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            errors = []
            for i in failed:
                try:
                    with open(stats_paths[i]) as f:
                        report = json.load(f)
                except (OSError, ValueError):
                    report = {"bad_input": False, "error": f"partition {i} died with exit code {procs[i].exitcode}"}
                if report.get("bad_input"):
                    raise BadInputError(report["error"])
                errors.append(report["error"])
            raise RuntimeError("; ".join(errors))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()

    total = _new_stats(config.json_keys)
    for path in stats_paths:
        with open(path) as f:
            total.add(PreprocessStats(**json.load(f)["stats"]))
    for key in config.json_keys:
        indexed.merge([prefixes[key] for prefixes in part_prefixes], final_prefixes[key], dtype)
    return total


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Run the whole preprocessing; outputs appear only if it succeeds.

    Raises:
        BadInputError: a bad line and ``skip_bad_lines`` is off.
        InputError: ``config.input`` names no file.
        ValueError: bad options, or no document at all for a key (nothing is written then).
    """
    config.validate()
    start = time.perf_counter()
    paths = expand_inputs(config.input)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    dtype = indexed.optimal_dtype(tokenizer.vocab_size).__name__
    total_bytes = sum(os.path.getsize(p) for p in paths)
    progress = Progress(total_bytes, config.log_interval, config.progress)
    try:
        with indexed.StagedOutputs(config.output_prefix) as staged:
            finals = {k: output_prefix_for(config.output_prefix, k) for k in config.json_keys}
            staged_prefixes = {k: staged.stage_dataset(p) for k, p in finals.items()}
            if config.partitions == 1:
                segments = [Segment(p) for p in paths]
                stats = _process_segments(config, segments, staged_prefixes, dtype, config.workers, progress.update)
            else:
                plan = plan_partitions(paths, config.partitions)
                stats = _run_partitions(config, plan, staged, staged_prefixes, dtype, progress)
            for key in config.json_keys:
                if not stats.written[key]:
                    raise ValueError(
                        f"no document with tokens for key {key!r} ({stats.documents} documents, "
                        f"{stats.empty_documents[key]} empty, {stats.bad_lines} bad lines skipped, "
                        f"{stats.blank_lines} blank lines): IndexedDataset cannot read an empty dataset, "
                        "so nothing was written"
                    )
            record = record_from_tokenizer(tokenizer, config.tokenizer_type, config.tokenizer_model)
            for prefix in finals.values():  # staged: the record appears with its .bin/.idx, before the .idx
                write_record_file(staged.stage(dataset_record_path(prefix)), record)
            stats.outputs = staged.commit()
    finally:
        progress.close()
    stats.seconds = time.perf_counter() - start
    return stats
