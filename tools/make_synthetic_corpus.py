"""Write the deterministic synthetic biography corpus, its held-out probes, and optional chat data."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        description=(
            "Generate biographies of fictional people (8 attributes each, varied sentence templates) as jsonl "
            '{"id", "text"}, question/cloze probes about them (worded unlike the corpus) as jsonl, and optionally '
            'chat conversations {"messages": [...]} about the same people. Same seed, same files.'
        )
    )
    parser.add_argument("--output", required=True, help="corpus .jsonl or .jsonl.gz")
    parser.add_argument("--probes-output", help="probes .jsonl (default: OUTPUT with _probes before the suffix)")
    parser.add_argument("--num-people", type=int, default=1000, help="synthetic people (each with a biography)")
    parser.add_argument("--bios-per-person", type=int, default=1, help="differently worded biographies per person")
    parser.add_argument("--chat-output", help="also write chat conversations here")
    parser.add_argument("--num-chats", type=int, default=1000, help="conversations written to --chat-output")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (the same seed gives the same files)")
    return parser


def default_probes_path(output: str) -> str:
    """``corpus.jsonl`` -> ``corpus_probes.jsonl`` (and likewise for ``.jsonl.gz``)."""
    for suffix in (".jsonl.gz", ".jsonl"):
        if output.endswith(suffix):
            return output[: -len(suffix)] + "_probes" + suffix
    return output + "_probes.jsonl"


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    from moc_megatron.data.jsonl import write_jsonl
    from moc_megatron.data.synthetic_corpus import corpus_documents, generate_people, probes, synthetic_chats

    if args.num_people < 1 or args.bios_per_person < 1:
        print("error: --num-people and --bios-per-person must be >= 1", file=sys.stderr)
        return 2
    people = generate_people(args.num_people, args.seed)
    n_docs = write_jsonl(args.output, corpus_documents(people, args.bios_per_person, args.seed))
    probes_path = args.probes_output or default_probes_path(args.output)
    n_probes = write_jsonl(probes_path, probes(people))
    print(f"wrote {n_docs} biographies to {args.output} and {n_probes} probes to {probes_path}", file=sys.stderr)
    if args.chat_output:
        n_chats = write_jsonl(args.chat_output, synthetic_chats(people, args.num_chats, args.seed))
        print(f"wrote {n_chats} conversations to {args.chat_output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
