"""Pretrain a Mixture-of-Chapters language model on megatron-core.

    torchrun --nproc_per_node=8 pretrain_moc.py --preset moc-paper --data-path ... --tokenizer-type ... \\
        --micro-batch-size 8 --global-batch-size 256 --train-iters 9600 --lr 3e-4 --bf16 --save ckpt

See docs/training.md for the flags, the log line, the checkpoint layout and how to resume.
"""

from __future__ import annotations

from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.errors import run_entry_point
from moc_megatron.training.loop import pretrain


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train; bad input stops with a one-line message (status 2 flags, 1 files)."""
    run = parse_run_config(argv)
    run_entry_point("pretrain_moc.py", lambda: pretrain(run))


if __name__ == "__main__":  # dist_checkpointing's save starts a spawn-context process: keep this guard
    main()
