"""Train a sentencepiece BPE tokenizer (byte fallback, lossless) from jsonl."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        description=(
            "Train a sentencepiece BPE model with byte fallback from the --json-key strings of jsonl files. "
            "The model is lossless (identity normalization, whitespace kept), has <unk>=0 <s>=1 </s>=2 <pad>=3, "
            "and holds the default chat template's markers as single tokens. Writes PREFIX.model and PREFIX.vocab; "
            "use it with --tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model."
        )
    )
    parser.add_argument(
        "--input", required=True, nargs="+", help="one or more .jsonl/.jsonl.gz files, globs, or directories"
    )
    parser.add_argument("--model-prefix", required=True, help="output path without .model")
    parser.add_argument("--vocab-size", type=int, default=4096, help="pieces in the model (chat markers included)")
    parser.add_argument("--json-key", default="text", help="key of the text in each jsonl line")
    parser.add_argument("--max-lines", type=int, default=2_000_000, help="train on at most this many text lines")
    parser.add_argument("--max-mb", type=float, default=200.0, help="train on at most this many MB of text")
    parser.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[], help="extra strings kept as single tokens")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    from moc_megatron.data.jsonl import BadLine, InputError, expand_inputs
    from moc_megatron.data.tokenizer_training import train_sentencepiece

    start = time.perf_counter()
    try:
        model = train_sentencepiece(
            [path for spec in args.input for path in expand_inputs(spec)],
            args.model_prefix,
            args.vocab_size,
            json_key=args.json_key,
            max_lines=args.max_lines,
            max_bytes=int(args.max_mb * 2**20),
            num_threads=args.threads,
            extra_symbols=args.user_defined_symbols,
        )
    except (BadLine, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # sentencepiece reports e.g. a vocabulary too large for the data this way
        print(f"error: sentencepiece training failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {model} (vocab {args.vocab_size}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
