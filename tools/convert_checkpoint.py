"""Convert between Megatron torch_dist checkpoints and Hugging Face MoC folders.

    export --load CKPT_DIR --output HF_DIR [--iteration N] [--tokenizer-model PATH] [--dtype fp32|bf16]
           [--max-shard-size 5GB]
           [--vocab-size N | --keep-padded-vocab]
    import --hf HF_DIR --save CKPT_DIR [--tensor-model-parallel-size N --pipeline-model-parallel-size N
           --expert-model-parallel-size N] [--moc-memory-layers ... other --moc-* flags: dense models only]

See docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys

from moc_megatron.hf.dist_reader import CheckpointReadError
from moc_megatron.hf.export import ExportError, ExportOptions, export_checkpoint
from moc_megatron.hf.hf_tokenizer import TokenizerError
from moc_megatron.hf.importer import ImportError_, ImportOptions, import_checkpoint
from moc_megatron.hf.names import UnsupportedModelError


def build_parser() -> argparse.ArgumentParser:
    """The ``export`` and ``import`` subcommands."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="Megatron torch_dist checkpoint (any TP/PP/EP/VPP layout) -> HF folder")
    ex.add_argument("--load", required=True, help="Checkpoint root (with latest_checkpointed_iteration.txt) "
                    "or one iter_XXXXXXX folder.")
    ex.add_argument("--output", required=True, help="HF folder to create (must not exist).")
    ex.add_argument("--iteration", type=int, default=None, help="Iteration to export (default: the tracker's).")
    ex.add_argument("--tokenizer-model", default=None,
                    help="Tokenizer to ship (sentencepiece .model or HF tokenizer folder); default: the one "
                         "recorded in the checkpoint's arguments; none for a mock-data checkpoint.")
    ex.add_argument("--tokenizer-type", default=None, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                    help="Type of --tokenizer-model (default: from its file name).")
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the written weights.")
    ex.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard (e.g. 5GB, 500MB).")
    ex.add_argument("--vocab-size", type=int, default=None,
                    help="True vocabulary of the model (default: the tokenizer's, or the saving run's --vocab-size "
                         "without one); rows beyond it are Megatron's padding and are dropped.")
    ex.add_argument("--keep-padded-vocab", action="store_true",
                    help="Export Megatron's padded vocabulary (needed when the true vocabulary is unknown).")
    im = sub.add_parser("import", help="HF folder (exported MoC, or dense Llama/Mistral/Qwen2/Qwen3 + --moc-* "
                        "flags) -> Megatron checkpoint at iteration 0",
                        epilog="A dense model also takes pretrain_moc.py's --moc-* flags (--moc-memory-layers, "
                               "--moc-num-chapters, --moc-chapter-size, --moc-top-k, --moc-routing-unit, ...): the "
                               "memory to add, new and with W_O = 0.")
    im.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors).")
    im.add_argument("--save", required=True, help="Checkpoint root to create (must not exist).")
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size"):
        im.add_argument(flag, type=int, default=1, help="Layout the checkpoint is checked for and its vocabulary "
                        "padded for (the saved tensors are global and load at any layout).")
    im.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                    help="pad the vocabulary to a multiple of this x TP, as pretrain_moc.py does (default: 128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is a one-line error and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    moc_flags: list[str] = []
    if argv[:1] == ["import"]:  # --moc-* flags pass through to the training argument parser
        keep, i = [], 0
        while i < len(argv):
            if argv[i].startswith("--moc-") or argv[i].startswith("--no-moc-"):
                moc_flags.append(argv[i])
                i += 1
                while i < len(argv) and not argv[i].startswith("--"):
                    moc_flags.append(argv[i])
                    i += 1
            else:
                keep.append(argv[i])
                i += 1
        argv = keep
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            export_checkpoint(ExportOptions(load=args.load, output=args.output, iteration=args.iteration,
                                            tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                                            dtype=args.dtype, max_shard_size=args.max_shard_size,
                                            vocab_size=args.vocab_size, keep_padded_vocab=args.keep_padded_vocab))
        else:
            import_checkpoint(ImportOptions(
                hf=args.hf, save=args.save, tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size, moc_flags=moc_flags,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by))
    except (ExportError, ImportError_, CheckpointReadError, TokenizerError, UnsupportedModelError, ValueError) as exc:
        print(f"convert_checkpoint.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
