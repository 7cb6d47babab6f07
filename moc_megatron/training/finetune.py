"""Instruction tuning (SFT) of a pretrained MoC checkpoint: ``finetune_moc.py``.

Reuses ``pretrain_moc.py``'s parser, validation, :class:`RunConfig`, setup and loop (:func:`loop.pretrain`)
and swaps in:

- the data: ``--sft-data-path PREFIX`` (``tools/preprocess_sft.py`` output) read by :class:`SFTDataset`,
  split into train/valid/test over samples by ``--split`` and repeated (reshuffled per epoch) as needed;
- the forward step: the loss counts only assistant tokens (``loss_mask``), and a packed sample gets a
  block-causal attention mask (conversations never attend to each other) and per-conversation position ids;
- the start: weights from ``--pretrained-checkpoint`` (iteration 0, no optimizer/scheduler/RNG, as
  Megatron-LM's ``--finetune``), unless ``--load`` holds a checkpoint of this finetuning run to resume.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from megatron.core.utils import get_attr_wrapped_model

from moc_megatron import platform
from moc_megatron.checkpoint.layout import CheckpointNotFoundError, resolve_load
from moc_megatron.data.sft_dataset import SFTDataset, packed_attention_mask
from moc_megatron.training.arguments import build_parser, parse_args, parse_run_config
from moc_megatron.training.data import split_sizes
from moc_megatron.training.logging import print_rank_0
from moc_megatron.training.run_config import CheckpointConfig, RunConfig
from moc_megatron.training.train_step import loss_func
from moc_megatron.training.validate_args import ArgumentsError, validate_args

IFT_EPILOG = """\
The paper's instruction-tuning (IFT) recipe:
  --lr-decay-style cosine --lr-warmup-iters 250 --lr 3e-5 --moc-memory-lr 1.5e-5 --moc-bank-lr 5e-6
  (or --moc-freeze-bank instead of --moc-bank-lr)

Data: --sft-data-path PREFIX is the --output-prefix of tools/preprocess_sft.py (use its --pack-length =
--seq-length); --split divides its samples into train/valid/test. Loss is on assistant tokens only.
Packed conversations are isolated from each other in attention. With --moc-routing-unit document each
conversation gets its own route; chunk routing restarts at every conversation with --reset-attention-mask;
with sequence routing (or chunk without it) packed conversations influence each other's chapter choice.

Start: --pretrained-checkpoint DIR (a pretrain_moc.py --save directory) loads the model weights only and
starts at iteration 0; with --load DIR holding a checkpoint of this finetuning run, it resumes instead.
"""


def build_finetune_parser() -> argparse.ArgumentParser:
    """``pretrain_moc.py``'s parser plus the instruction-tuning flags."""
    parser = build_parser()
    parser.usage = ("%(prog)s [--preset NAME] --pretrained-checkpoint DIR --sft-data-path PREFIX\n"
                    "         --tokenizer-type T --tokenizer-model PATH [--train-iters N] [--lr LR]\n"
                    "         [--save DIR [--load DIR]] [FLAG ...]")
    parser.description = """\
Instruction-tune (SFT) a pretrained Mixture-of-Chapters model on chat data (loss on assistant tokens only).

Most used flags (all flags, grouped, below; the IFT recipe at the end):
  --pretrained-checkpoint DIR      a pretrain_moc.py --save folder: its weights, iteration 0
  --sft-data-path PREFIX           the output prefix of tools/preprocess_sft.py; --split 98,2,0
  --tokenizer-type T --tokenizer-model PATH   the tokenizer of the data (and of the checkpoint)
  --preset NAME and the model flags of the pretrained run
  --micro-batch-size N --global-batch-size N --train-iters N --lr LR --moc-memory-lr LR --moc-bank-lr LR
  --save DIR --load DIR            --load of its own --save folder resumes the tuning run when it holds one
"""
    parser.epilog = IFT_EPILOG
    g = parser.add_argument_group("instruction tuning")
    g.add_argument("--sft-data-path", default=None,
                   help="Output prefix of tools/preprocess_sft.py (instead of --data-path).")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="A pretrain_moc.py --save directory: weights only, iteration 0 (unless --load resumes).")
    return parser


def validate_finetune_args(args: argparse.Namespace) -> RunConfig:
    """:func:`validate_args` with ``--sft-data-path`` (checked here) as the data source."""
    if args.sft_data_path is None:
        raise ArgumentsError("finetune_moc.py needs --sft-data-path (the output prefix of tools/preprocess_sft.py)")
    other = [flag for flag, value in (("--data-path", args.data_path), ("--train-data-path", args.train_data_path),
                                      ("--valid-data-path", args.valid_data_path),
                                      ("--test-data-path", args.test_data_path), ("--mock-data", args.mock_data))
             if value]
    if other:
        raise ArgumentsError(f"--sft-data-path replaces {', '.join(other)}: give only --sft-data-path")
    if args.tokenizer_type is None or args.tokenizer_model is None:
        raise ArgumentsError("--sft-data-path needs --tokenizer-type and --tokenizer-model (those of the data)")
    if args.pretrained_checkpoint is None and args.load is None:
        raise ArgumentsError("give --pretrained-checkpoint (or --load to resume a finetuning run)")
    run = validate_args(args, data_source_checked=True)
    sft_split(args.split, 1)  # the --split string parses
    return run


def parse_finetune_args(argv: Sequence[str] | None = None, world_size: int | None = None,
                        exit_on_error: bool = True) -> argparse.Namespace:
    """As :func:`arguments.parse_args`, for ``finetune_moc.py``."""
    return parse_args(argv, world_size, exit_on_error, parser=build_finetune_parser(),
                      validate=validate_finetune_args)


def parse_finetune_run_config(argv: Sequence[str] | None = None, world_size: int | None = None,
                              exit_on_error: bool = True) -> RunConfig:
    """As :func:`arguments.parse_run_config`, for ``finetune_moc.py``."""
    return parse_run_config(argv, world_size, exit_on_error, parser=build_finetune_parser(),
                            validate=validate_finetune_args)


def _start(ckpt: CheckpointConfig) -> tuple[str, dict[str, Any]]:
    """``("resume", {})``, or ``("pretrained", the checkpointing changes that load those weights)``.

    ``--load`` resumes when it holds a checkpoint (a folder with a tracker, or an ``iter_*`` folder);
    ``--pretrained-checkpoint`` must hold one (either form). Raises ``CheckpointNotFoundError`` otherwise.
    """
    own = ckpt.save is not None and ckpt.load is not None and \
        os.path.realpath(ckpt.save) == os.path.realpath(ckpt.load)
    if ckpt.load is not None and resolve_load(ckpt.load, own_save=own) is not None:
        return "resume", {}
    if ckpt.pretrained_checkpoint is None:
        raise CheckpointNotFoundError(f"--load {ckpt.load}: no checkpoint, and no --pretrained-checkpoint")
    if resolve_load(ckpt.pretrained_checkpoint, "--pretrained-checkpoint") is None:
        raise CheckpointNotFoundError(
            f"--pretrained-checkpoint {ckpt.pretrained_checkpoint}: no checkpoint there "
            f"(give a pretrain_moc.py --save folder or one of its iter_* folders)")
    return "pretrained", {"load": ckpt.pretrained_checkpoint, "finetune": True}


def start_run(run: RunConfig) -> tuple[str, RunConfig]:
    """``"resume"`` or ``"pretrained"``, and the run pointed at what to load (``--load``, ``--finetune``)."""
    start, changes = _start(run.checkpointing)
    return start, run.replace("checkpointing", **changes) if changes else run


def sft_split(split: str, num_samples: int) -> list[range]:
    """Contiguous train/valid/test ranges of ``num_samples`` sample indices by ``--split`` weights."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError as exc:
        raise ArgumentsError(f"--split {split!r}: give comma-separated weights") from exc
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ArgumentsError(f"--split {split!r}: weights must be non-negative and not all zero")
    bounds = np.concatenate([[0], np.round(np.cumsum(weights) / sum(weights) * num_samples)]).astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class RepeatedSplit(torch.utils.data.Dataset):
    """``num_samples`` samples drawn epoch by epoch from ``indices`` of ``dataset`` (reshuffled per epoch)."""

    def __init__(self, dataset: SFTDataset, indices: range, num_samples: int, seed: int, shuffle: bool) -> None:
        if len(indices) == 0:
            raise ValueError("empty split")
        self.dataset, self.indices, self.num_samples = dataset, np.asarray(indices), num_samples
        self.seed, self.shuffle = seed, shuffle
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = self.indices
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
            self._orders[epoch] = order
        return self._orders[epoch]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(int(idx), len(self.indices))
        return self.dataset[int(self._order(epoch)[pos])]


def build_sft_datasets(run: RunConfig, tokenizer=None) -> tuple:
    """``(train, valid, test)`` over ``--sft-data-path`` (``None`` for an empty split).

    Built on every rank: middle pipeline stages need the segment ids for the attention mask.
    """
    data = run.data
    base = SFTDataset(data.sft_data_path, data.seq_length)
    out = []
    for i, (indices, size) in enumerate(zip(sft_split(data.split, len(base)), split_sizes(run))):
        ok = len(indices) > 0 and size > 0
        out.append(RepeatedSplit(base, indices, size, run.seed, shuffle=i == 0) if ok else None)
    print_rank_0(f" > SFT data {data.sft_data_path}: {len(base)} samples, split "
                 f"{[len(r) for r in sft_split(data.split, len(base))]} (train/valid/test)")
    return tuple(out)


def sft_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """:func:`train_step.loss_func` on assistant tokens; a micro-batch without any still divides by 1."""
    loss_sum, num_tokens, report = loss_func(loss_mask, output_tensor)
    return loss_sum, num_tokens.clamp(min=1), report


def sft_batch(data_iterator) -> dict[str, torch.Tensor]:
    """The next SFT micro-batch on the device, with its block-causal ``attention_mask`` [b, 1, s, s]."""
    batch = next(data_iterator)
    device = platform.get_device()
    batch = {k: batch[k].to(device, non_blocking=True)
             for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")}
    batch["attention_mask"] = packed_attention_mask(batch["segment_ids"])
    return batch


def sft_forward_step(data_iterator, model: torch.nn.Module):
    """megatron ``forward_step_func`` for SFT: masked (assistant-only) loss, block-causal attention.

    Every stage reads the batch (the mask is needed in every layer). RoPE is relative, so within the
    block-causal mask per-conversation positions are equivalent to the ``position_ids`` passed here.
    """
    pre_process = get_attr_wrapped_model(model, "pre_process")
    post_process = get_attr_wrapped_model(model, "post_process")
    batch = sft_batch(data_iterator)
    output = model(
        batch["tokens"] if pre_process else None,
        batch["position_ids"] if pre_process else None,
        batch["attention_mask"],
        labels=batch["labels"] if post_process else None,
        document_ids=batch["segment_ids"],  # a conversation is a document: its own route with document routing
    )
    return output, partial(sft_loss_func, batch["loss_mask"])


def _print_first_rank(message: str) -> None:
    """Print on global rank 0 (torchrun's ``RANK``); usable before the process group exists."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def finetune(run: RunConfig):
    """Instruction-tune; returns the loop's ``PretrainResult``."""
    from moc_megatron.training.loop import pretrain

    start, run = start_run(run)
    if start == "pretrained":
        _print_first_rank(f" > finetuning from pretrained weights {run.checkpointing.pretrained_checkpoint} "
                          "(iteration 0)")
    else:
        _print_first_rank(f" > resuming the finetuning run in {run.checkpointing.load}")
    if run.model.has_memory and run.model.moc_routing_unit == "sequence":
        _print_first_rank(" > note: --moc-routing-unit sequence pools over the whole packed sample; packed "
                          "conversations share their chapter routing (--moc-routing-unit document routes each one)")
    return pretrain(run, datasets_provider=build_sft_datasets, forward_step_func=sft_forward_step)
