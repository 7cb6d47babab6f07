"""Fact recall of a Megatron checkpoint or a Hugging Face model on held-out probes.

    python tools/evaluate_probes.py --load runs/x/checkpoints --probes data/probes.jsonl --json out.json
    python tools/evaluate_probes.py --hf runs/x/hf --probes data/probes.jsonl --max-candidates 20

See ``moc_megatron/eval/`` and docs/knowledge.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Fact recall on held-out probes (jsonl lines with prompt, completion, attribute), per attribute and
overall, measured two ways:
  exact   greedy generation of as many tokens as the completion has, compared as text with it;
  mc      the completion's rank among all values its attribute takes in the candidates file (every
          distinct completion of that attribute), by sum of token log-likelihoods after the prompt
          (ties count against the true value); 'mc acc' is the fraction ranked first, MRR the mean
          reciprocal rank, 'chance' the mc accuracy of random ranking.
With --valid-data, also the mean next-token loss on held-out text. Sequences are batched by exact length,
never padded, so sequence-routed MoC models see each sequence as they would alone. Prints a table;
--json writes the numbers to a file."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", metavar="CKPT_DIR",
                     help="pretrain_moc.py/finetune_moc.py --save directory (latest iteration) or an iter_XXXXXXX "
                          "folder; the model is rebuilt from its saved flags, single process on the CPU")
    src.add_argument("--hf", metavar="HF_DIR", help="Hugging Face model folder (AutoModelForCausalLM, "
                                                    "trust_remote_code=True, local files only)")
    parser.add_argument("--iteration", type=int, default=None, help="with --load: this iteration, not the latest")
    parser.add_argument("--probes", required=True, metavar="FILE", help="probes jsonl to evaluate")
    parser.add_argument("--candidates", metavar="FILE",
                        help="probes jsonl whose completions are each attribute's candidate values (default: --probes)")
    parser.add_argument("--max-candidates", type=int, default=None, metavar="K",
                        help="at most K candidates per probe: the true value and K-1 distractors drawn with --seed "
                             "(default: all values)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N probes")
    parser.add_argument("--valid-data", metavar="PREFIX", help="Megatron indexed dataset (.bin/.idx prefix) of "
                                                               "held-out text: report the validation loss on it")
    parser.add_argument("--valid-seq-length", type=int, default=256, help="tokens per --valid-data sequence")
    parser.add_argument("--valid-max-sequences", type=int, default=64,
                        help="most --valid-data sequences scored")
    parser.add_argument("--tokenizer-type", default=None, help="override the checkpoint's/folder's tokenizer")
    parser.add_argument("--tokenizer-model", default=None,
                        help="override the checkpoint's/folder's tokenizer file (with --tokenizer-type)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-candidates draw")
    parser.add_argument("--json", metavar="FILE",
                        help="write the results as JSON to FILE ('-': to stdout, and the table to stderr)")
    parser.add_argument("--outcomes", action="store_true", help="include every probe's outcome in the JSON")
    return parser


def _check(args: argparse.Namespace) -> str | None:
    if args.max_candidates is not None and args.max_candidates < 2:
        return "--max-candidates must be at least 2"
    if args.limit is not None and args.limit < 1:
        return "--limit must be positive"
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        return "give --tokenizer-type and --tokenizer-model together"
    if args.iteration is not None and args.load is None:
        return "--iteration needs --load"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    error = _check(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from moc_megatron.eval.evaluate import EvalSettings, evaluate_model
    from moc_megatron.eval.models import CheckpointLoadError, load_hf, load_megatron
    from moc_megatron.eval.probes import ProbeFileError
    from moc_megatron.eval.scoring import format_report

    try:
        if args.load:
            model = load_megatron(args.load, args.iteration, args.tokenizer_type, args.tokenizer_model)
        else:
            model = load_hf(args.hf, args.tokenizer_type, args.tokenizer_model)
        settings = EvalSettings(probes=args.probes, candidates=args.candidates, max_candidates=args.max_candidates,
                                limit=args.limit, valid_data=args.valid_data, valid_seq_length=args.valid_seq_length,
                                valid_max_sequences=args.valid_max_sequences, max_batch_tokens=args.max_batch_tokens,
                                seed=args.seed)
        report = evaluate_model(model, settings)
    except (CheckpointLoadError, ProbeFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    title = f"{model.backend} model {args.load or args.hf} {model.info.get('iteration', '')}"
    # With --json - stdout carries only the JSON; the table goes to stderr.
    print(format_report(report, title), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        payload = {"model": model.info, "backend": model.backend, "probes": args.probes,
                   **report.to_dict(with_outcomes=args.outcomes)}
        text = json.dumps(payload, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
