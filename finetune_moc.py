"""Instruction-tune (SFT) a pretrained Mixture-of-Chapters model on chat data from tools/preprocess_sft.py.

    torchrun --nproc_per_node=8 finetune_moc.py --preset moc-paper --pretrained-checkpoint ckpt/moc-paper \\
        --sft-data-path data/chat --tokenizer-type ... --tokenizer-model ... --split 98,2,0 \\
        --micro-batch-size 8 --global-batch-size 128 --train-iters 2000 --bf16 \\
        --lr 3e-5 --moc-memory-lr 1.5e-5 --moc-bank-lr 5e-6 --lr-decay-style cosine --lr-warmup-iters 250 \\
        --save ckpt/moc-paper-ift

Same flags as pretrain_moc.py; see docs/training.md, "Instruction tuning".
"""

from __future__ import annotations

from moc_megatron.training.errors import run_entry_point
from moc_megatron.training.finetune import finetune, parse_finetune_run_config


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and finetune."""
    run = parse_finetune_run_config(argv)
    run_entry_point("finetune_moc.py", lambda: finetune(run))


if __name__ == "__main__":  # dist_checkpointing's save starts a spawn-context process: keep this guard
    main()
