"""Tokenize jsonl corpora into Megatron indexed datasets: ``{prefix}_{key}_document.bin/.idx``.

Megatron-LM's command line (``--input``, ``--output-prefix``, ``--json-keys``, ``--tokenizer-type``,
``--tokenizer-model``, ``--append-eod``, ``--workers``, ``--partitions``, ``--log-interval``); the output
is read by ``megatron.core.datasets.indexed_dataset.IndexedDataset``.

Exit status: 0 all lines used; 1 failed (nothing written); 2 bad arguments; 3 finished, but bad lines
were skipped (``--skip-bad-lines``); 130/143 interrupted by SIGINT/SIGTERM (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from moc_megatron.data.tool_runner import EXIT_OK, EXIT_SKIPPED, print_skipped_and_outputs, run_guarded

EPILOG = """\
policies:
  blank lines        lines holding only whitespace are ignored and counted.
  bad lines          malformed JSON, a line that is not a JSON object, a missing key, a non-string value,
                     invalid UTF-8 (or a lone surrogate) stop the run with file:line: reason, and nothing
                     is written; with --skip-bad-lines they are skipped (for every key), counted, and the
                     first 20 are listed at the end, and the exit status is 3.
  empty documents    a document with no tokens (empty text) is not written - a zero-length sequence is
                     useless to training - and is counted per key; it is not an error. With several
                     --json-keys, each key's dataset drops its own empty documents.
  outputs            written under a hidden temporary folder beside the prefix and moved into place only
                     when the run succeeded (the .idx last), so a failed or interrupted run never leaves
                     files that look complete.

exit status: 0 ok, 1 failed, 2 bad arguments, 3 ok but bad lines were skipped,
             130 interrupted (Ctrl-C), 143 terminated (SIGTERM); nothing is written unless 0 or 3.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from moc_megatron.data.tokenizer import TOKENIZER_TYPES

    parser = argparse.ArgumentParser(
        description="Tokenize jsonl (or jsonl.gz) into Megatron .bin/.idx indexed datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="a .jsonl/.jsonl.gz file, a glob, or a directory (recursive)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON line")
    group.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of failing")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES,
                       help="kind of --tokenizer-model")
    group.add_argument(
        "--tokenizer-model", required=True, help="sentencepiece .model file, or local Hugging Face tokenizer folder"
    )
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the outputs, without suffix")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer worker processes (total, all partitions)")
    group.add_argument(
        "--partitions", type=int, default=1, help="split the input into this many parts, each with its own writer"
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress lines (when stderr is not a tty)"
    )
    group.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes of input lines per worker task")
    group.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


def print_summary(stats, keys: list[str]) -> None:
    """Final report on stderr."""
    secs = max(stats.seconds, 1e-9)
    print(
        f"Done: {stats.documents} documents, {stats.tokens} tokens, {stats.input_bytes / 2**20:.2f} MB in "
        f"{stats.seconds:.2f} s ({stats.documents / secs:,.1f} docs/s, {stats.tokens / secs:,.0f} tokens/s, "
        f"{stats.input_bytes / 2**20 / secs:.2f} MB/s).",
        file=sys.stderr,
    )
    for key in keys:
        print(
            f"  {key}: {stats.written[key]} documents written, {stats.empty_documents[key]} empty documents dropped",
            file=sys.stderr,
        )
    print_skipped_and_outputs(stats)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    from moc_megatron.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
        chunk_bytes=args.chunk_bytes,
        progress=not args.no_progress,
    )
    stats = run_guarded(lambda: preprocess(config))
    if isinstance(stats, int):
        return stats
    print_summary(stats, list(config.json_keys))
    return EXIT_SKIPPED if stats.bad_lines else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
