"""The learned memory bank: shared chapters (replicated) and this rank's block of routed chapters."""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from torch import nn

from moc_megatron.config import MoCConfig
from moc_megatron.parallel.groups import MemoryGroups
from moc_megatron.platform import get_device


class _GatherRowsIntoGrad(torch.autograd.Function):
    """``weight[index]`` whose backward adds into the weight's gradient row by row.

    ``index_select``'s own backward builds a zero tensor the size of the whole bank for every call;
    this one writes only the selected rows, into megatron's ``main_grad`` when DDP gave the weight one
    (as megatron's gradient-accumulation fusion does) or into ``weight.grad`` otherwise.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.weight = weight
        ctx.save_for_backward(index)
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        (index,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, index, grad_output.to(weight.grad.dtype))
            return None, None
        main_grad.index_add_(0, index, grad_output.to(main_grad.dtype))
        # As megatron's gradient-accumulation fusion does: an uninitialised placeholder gradient (never
        # read: grad_added_to_main_grad tells DDP's hook to skip it) keeps DDP's grad-ready hooks firing,
        # which overlapped gradient reduction needs.
        weight.grad_added_to_main_grad = True
        return torch.empty_like(weight, requires_grad=False), None


def gather_rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select ``weight[index]`` (dim 0) without a dense-gradient temporary in backward."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight.index_select(0, index)
    return _GatherRowsIntoGrad.apply(weight, index)


class MemoryBank(nn.Module):
    """Memory tokens of one bank, laid out ``[chapters, chapter_size, bank_dim]``.

    ``shared`` holds the ``S`` shared chapters (a dense parameter, replicated on every rank; with
    ``S = 0`` an empty buffer that is neither saved nor trained).
    ``routed`` holds this expert-parallel rank's contiguous block of routed chapters; it is an expert
    parameter (``allreduce=False``), so megatron's DDP reduces its gradient over the
    expert-data-parallel group only. ``routed_offset`` is the global index of its first chapter.

    ``groups`` (from megatron's ``pg_collection``, see :mod:`moc_megatron.parallel.groups`) give the
    expert-parallel place and the checkpoint replica coordinates; without them the bank is the single
    rank ``ep_rank`` of ``ep_size``.
    """

    def __init__(self, config: MoCConfig, ep_rank: int = 0, ep_size: int = 1,
                 groups: MemoryGroups | None = None) -> None:
        super().__init__()
        self.config = config
        self.groups = MemoryGroups() if groups is None else groups
        if groups is not None:
            ep_rank, ep_size = groups.ep_rank, groups.ep_size
        routed_total = config.moc_num_routed_chapters
        if routed_total % ep_size:
            raise ValueError(
                f"{routed_total} routed chapters do not divide over expert-model-parallel-size {ep_size}"
            )
        self.num_local_routed = routed_total // ep_size
        self.routed_offset = ep_rank * self.num_local_routed
        shape = (config.moc_chapter_size, config.moc_bank_dim)
        device = None if config.use_cpu_initialization else get_device()
        shared = torch.empty(config.moc_num_shared_chapters, *shape, dtype=config.params_dtype, device=device)
        if shared.numel():
            self.shared = nn.Parameter(shared)
        else:
            # No shared chapters: a zero-size tensor that megatron-core's dist_checkpointing cannot save
            # and its optimizer cannot shard, so a buffer outside state dicts, DDP and the optimizer.
            self.register_buffer("shared", shared, persistent=False)
        self.routed = nn.Parameter(
            torch.empty(self.num_local_routed, *shape, dtype=config.params_dtype, device=device)
        )
        self.routed.allreduce = False  # expert parameter for megatron's DDP and optimizer
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.pipeline_replica = 0
        """Non-zero on pipeline stages that hold a copy of a bank saved by another stage."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, moc_bank_init_std); each routed chapter's draw depends only on its global index."""
        if self.routed.is_meta or not self.config.perform_initialization:
            return
        std = self.config.moc_bank_init_std
        gen = torch.Generator().manual_seed(self.config.moc_bank_seed)
        with torch.no_grad():
            self.shared.copy_(torch.randn(self.shared.shape, generator=gen) * std)
            # Drawing all routed chapters then slicing keeps init identical for every EP layout.
            # Chunked so a paper-size bank never lives twice in memory.
            t, d = self.routed.shape[1:]
            for start in range(0, self.config.moc_num_routed_chapters, 256):
                stop = min(start + 256, self.config.moc_num_routed_chapters)
                block = torch.randn((stop - start, t, d), generator=gen) * std
                lo, hi = max(start, self.routed_offset), min(stop, self.routed_offset + self.num_local_routed)
                if lo < hi:
                    self.routed[lo - self.routed_offset : hi - self.routed_offset].copy_(
                        block[lo - start : hi - start]
                    )

    def routed_rows(self, local_chapters: torch.Tensor) -> torch.Tensor:
        """Memory tokens of the given local routed chapters, ``[n, chapter_size, bank_dim]``."""
        return gather_rows(self.routed, local_chapters)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """Checkpoint entries: the routed shard at its global chapter offset, the shared chapters replicated.

        The routed chapters are one tensor ``[num_routed, T, d]`` in the checkpoint whatever the
        expert-parallel layout, so a bank saved at one EP size loads at any other.
        """
        groups = self.groups
        tp_rank, dp_rank, edp_rank = groups.tp_rank, groups.dp_rank, groups.edp_rank
        axis = len(sharded_offsets)
        routed = ShardedTensor.from_rank_offsets(
            f"{prefix}routed", self.routed, *sharded_offsets, (axis, self.ep_rank, self.ep_size),
            replica_id=(self.pipeline_replica, tp_rank, edp_rank), prepend_axis_num=axis,
        )
        if not isinstance(self.shared, nn.Parameter):
            return {f"{prefix}routed": routed}  # no shared chapters
        shared = ShardedTensor.from_rank_offsets(
            f"{prefix}shared", self.shared, *sharded_offsets,
            replica_id=(self.pipeline_replica, tp_rank, dp_rank), prepend_axis_num=axis,
        )
        return {f"{prefix}routed": routed, f"{prefix}shared": shared}

