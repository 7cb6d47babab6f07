"""Tokenize chat jsonl for supervised fine-tuning: token ids plus a loss mask that is 1 on assistant tokens.

Input lines are ``{"messages": [{"role": ..., "content": ...}, ...]}``. Outputs ``{prefix}_tokens.bin/.idx``,
``{prefix}_loss_mask.bin/.idx`` and ``{prefix}_meta.json``, served to training by
``moc_megatron.data.sft_dataset.SFTDataset``.

Exit status: 0 ok; 1 failed (nothing written); 2 bad arguments; 3 finished, but bad lines were skipped;
130/143 interrupted by SIGINT/SIGTERM (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from moc_megatron.data.tool_runner import EXIT_OK, EXIT_SKIPPED, print_skipped_and_outputs, run_guarded

EPILOG = """\
chat template:
  auto      the tokenizer's own chat template (tokenizer_config.json / chat_template.jinja of a Hugging Face
            folder); the default template when it has none (sentencepiece models never have one).
  default   the documented default, whatever the tokenizer:
              <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n
  FILE      a Jinja template file (Hugging Face conventions: messages, add_generation_prompt, bos_token...).
  The loss mask is 1 on what the template emits for each assistant message after the generation prompt
  (for the default template: the content and "<|end|>\\n"); every conversation ends with eod (mask 0).

packing (--pack-length N):
  whole conversations are packed first-fit into samples of at most N tokens, in input order as far as
  possible; a conversation is never split; one longer than N is dropped and counted. Use N = the
  training --seq-length. Without packing each conversation is its own sample.

policies:
  bad lines   malformed JSON, invalid UTF-8, a missing 'messages' key, a message without a string role or
              content, or a template that cannot render the conversation stop the run with file:line: reason;
              with --skip-bad-lines they are skipped, counted and listed (first 20), and the exit status is 3.
  skipped     blank lines; conversations without any assistant token (nothing to learn) are dropped and
              counted.

exit status: 0 ok, 1 failed, 2 bad arguments, 3 ok but bad lines were skipped,
             130 interrupted (Ctrl-C), 143 terminated (SIGTERM); nothing is written unless 0 or 3.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from moc_megatron.data.tokenizer import TOKENIZER_TYPES

    parser = argparse.ArgumentParser(
        description="Tokenize chat jsonl into token ids + assistant loss mask (Megatron .bin/.idx) for SFT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="a .jsonl/.jsonl.gz file, a glob, or a directory")
    parser.add_argument("--output-prefix", required=True, help="path prefix of the outputs")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES, help="kind of --tokenizer-model")
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model, or local HF tokenizer folder")
    parser.add_argument("--json-key", default="messages", help="key holding the list of messages")
    parser.add_argument("--chat-template", default="auto", help="'auto', 'default', or a Jinja template file")
    parser.add_argument("--pack-length", type=int, default=None, help="pack conversations into N-token samples")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--log-interval", type=int, default=1000, help="conversations between progress lines")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of failing")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes of input lines per worker task")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    from moc_megatron.data.sft_preprocess import SFTConfig, preprocess_sft

    config = SFTConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        messages_key=args.json_key,
        chat_template=args.chat_template,
        pack_length=args.pack_length,
        workers=args.workers,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
        chunk_bytes=args.chunk_bytes,
        progress=not args.no_progress,
    )
    stats = run_guarded(lambda: preprocess_sft(config))
    if isinstance(stats, int):
        return stats
    secs = max(stats.seconds, 1e-9)
    print(
        f"Done: {stats.conversations} conversations in {stats.samples} samples, {stats.tokens} tokens "
        f"({stats.assistant_tokens} assistant) in {stats.seconds:.2f} s ({stats.conversations / secs:,.1f} conv/s).",
        file=sys.stderr,
    )
    if config.pack_length:
        print(
            f"  packing efficiency {stats.packing_efficiency(config.pack_length):.1%}; "
            f"{stats.dropped_too_long} conversations longer than {config.pack_length} tokens dropped",
            file=sys.stderr,
        )
    if stats.dropped_no_assistant:
        print(f"  {stats.dropped_no_assistant} conversations without assistant tokens dropped", file=sys.stderr)
    print_skipped_and_outputs(stats)
    return EXIT_SKIPPED if stats.bad_lines else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
