"""Parameters and per-sequence FLOPs of a named MoC model preset.

Parameters are counted on the real model, built on the meta device (seconds, no memory); FLOPs follow
the paper's Appendix A.2 rules (batch 1, backward = 2 x forward). See ``moc_megatron/model/flops.py``.

    python tools/estimate_flops.py --preset moc-paper
    python tools/estimate_flops.py --preset moc-tiny --seq-length 512 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from moc_megatron.presets import PRESETS

    parser = argparse.ArgumentParser(description="Parameters and per-sequence FLOPs of a model preset.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS),
                        help="named model (moc_megatron/presets.py)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--moc-routing-unit", default=None, choices=["sequence", "document", "chunk", "token"],
                        help="routing unit to count (default: the preset's)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="sequences per micro-batch: the memory projects each chapter with traffic once per "
                             "micro-batch, so chunk and token routing cost less per sequence in larger ones "
                             "(default: 1)")
    parser.add_argument("--documents-per-sequence", type=float, default=1.0,
                        help="documents packed into one sequence, on average: the routes of document routing "
                             "(default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _millions(n: int) -> str:
    return f"{n:>15,}  ({n / 1e6:9.2f} M)"


def _tera(n: int) -> str:
    scale, unit = (1e12, "T") if n >= 1e11 else (1e9, "G")
    return f"{n:>22,}  ({n / scale:7.3f} {unit})"


def format_estimate(summary: dict) -> str:
    """The human-readable report of :meth:`Estimate.to_dict`'s output."""
    arch = summary["architecture"]
    p = summary["parameters"]
    f = summary["flops_per_sequence"]
    lines = [
        f"preset {summary['preset']}: {arch['num_layers']} layers, hidden {arch['hidden_size']}, "
        f"{arch['num_attention_heads']} heads / {arch['num_query_groups']} KV heads, ffn {arch['ffn_hidden_size']}, "
        f"vocabulary {summary['vocab_size']}",
    ]
    if arch["memory_layers"]:
        lines.append(
            f"memory layers {arch['memory_layers']}: {arch['num_chapters']} chapters x {arch['chapter_size']} tokens "
            f"({arch['num_shared_chapters']} shared), top-{arch['top_k']}, {arch['memory_heads']} memory heads, "
            f"{arch['routing_unit']} routing, {arch['gating']} gating, N_sel = {arch['selected_memory_tokens']}"
        )
    lines += [
        "",
        "parameters (tied embeddings counted once)",
        f"  total          {_millions(p['total'])}",
        f"  backbone       {_millions(p['backbone'])}",
        f"  bank           {_millions(p['bank'])}",
        f"  memory layers  {_millions(p['memory_layers'])}",
        "",
        f"FLOPs per sequence (batch 1, sequence length {summary['seq_length']}; backward = 2 x forward)",
        f"  forward           {_tera(f['forward'])}",
        f"  backward          {_tera(f['backward'])}",
        f"  forward+backward  {_tera(f['forward_backward'])}",
        "",
        "forward by component",
    ]
    lines += [f"  {name:<18}{value:>22,}" for name, value in f["components"].items() if value]
    paper = summary.get("flops_per_sequence_paper_convention")
    if paper is not None:
        lines += [
            "",
            "with the paper code's router convention (router over all C chapters, its extra router-loss terms):",
            f"  forward           {_tera(paper['forward'])}",
            f"  forward+backward  {_tera(paper['forward_backward'])}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.seq_length is not None and args.seq_length < 1:
        print("--seq-length must be positive", file=sys.stderr)
        return 2
    if args.micro_batch_size < 1 or args.documents_per_sequence < 1:
        print("--micro-batch-size and --documents-per-sequence must be at least 1", file=sys.stderr)
        return 2
    from moc_megatron.model.model_report import estimate_preset

    summary = estimate_preset(args.preset, args.seq_length, routing_unit=args.moc_routing_unit,
                              micro_batch_size=args.micro_batch_size,
                              documents=args.documents_per_sequence).to_dict()
    print(json.dumps(summary, indent=2) if args.json else format_estimate(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
