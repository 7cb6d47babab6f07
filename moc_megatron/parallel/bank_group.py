"""The bank group: pipeline ranks that each hold a copy of the shared memory bank.

A bank read by memory layers on several pipeline stages lives on each of those stages (and on each
virtual-pipeline chunk that has a memory layer). Like megatron's tied embeddings, the copies start
identical (the bank's initialisation is seeded by ``moc_bank_seed``) and stay identical because their
gradients are summed before every optimizer step:

1. :func:`initialize_bank_groups` (collective) finds, for every pipeline group, the ranks whose
   stage holds a bank and creates one process group per such set (one per (TP, DP/EP) coordinate).
2. :func:`mark_bank_parameters` (before DDP wrapping) gives every bank copy its own DDP bucket under
   the distributed optimizer, so the data-parallel shards of the copies line up (megatron does the same
   for tied embeddings via ``shared_embedding``), and marks the non-primary copies ``shared`` so the
   gradient norm counts the bank once.
3. :func:`finalize_model_grads_with_bank` is megatron's ``finalize_model_grads`` followed by the
   all-reduce of the bank gradients over the bank group; set it as ``config.finalize_model_grads_func``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model

_BANK_GROUP: dist.ProcessGroup | None = None
_BANK_GROUP_RANKS: tuple[int, ...] = ()


def local_banks(model_chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The shared ``MemoryBank`` of every local model chunk that has one (wrappers are looked through)."""
    banks = []
    for chunk in model_chunks:
        bank = get_attr_wrapped_model(chunk, "memory_bank", allow_none=True)
        if bank is not None:
            banks.append(bank)
    return banks


def initialize_bank_groups(model_chunks: Sequence[torch.nn.Module]) -> tuple[int, ...]:
    """Create the bank process groups (every rank must call this); return this rank's bank-group ranks.

    The returned tuple is empty when this rank holds no bank, and has one entry when no other pipeline
    rank holds a copy (no group is created then).
    """
    global _BANK_GROUP, _BANK_GROUP_RANKS
    pp_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    mine = (dist.get_rank(), pp_ranks, bool(local_banks(model_chunks)))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    has_bank = {rank: flag for rank, _, flag in everyone}
    pipeline_groups = sorted({ranks for _, ranks, _ in everyone})
    _BANK_GROUP, _BANK_GROUP_RANKS = None, ()
    for ranks in pipeline_groups:
        members = tuple(r for r in ranks if has_bank[r])
        # new_group is collective over the whole world: every rank creates every group, in order.
        group = dist.new_group(list(members)) if len(members) > 1 else None
        if dist.get_rank() in members:
            _BANK_GROUP, _BANK_GROUP_RANKS = group, members
    return _BANK_GROUP_RANKS


def bank_has_copies(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether the bank of this rank also lives elsewhere (another rank or another local chunk)."""
    return _BANK_GROUP is not None or len(local_banks(model_chunks)) > 1


def mark_bank_parameters(model_chunks: Sequence[torch.nn.Module], use_distributed_optimizer: bool) -> None:
    """Prepare the bank copies for DDP and the optimizer; call after :func:`initialize_bank_groups`."""
    if not bank_has_copies(model_chunks):
        return
    for bank in local_banks(model_chunks):
        for param in bank.parameters():
            if use_distributed_optimizer:
                param.shared_embedding = True  # own DDP bucket: identical DP sharding on every copy
            if bank.pipeline_replica != 0:
                param.shared = True  # counted once in the gradient norm


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def allreduce_bank_grads(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Sum the bank gradients over the local chunks and the bank group; every copy gets the sum."""
    banks = local_banks(model_chunks)
    if not banks or not bank_has_copies(model_chunks):
        return
    names = [name for name, p in banks[0].named_parameters() if p.requires_grad]
    for name in names:
        grads = [_grad_of(dict(bank.named_parameters())[name]) for bank in banks]
        grads = [g for g in grads if g is not None]
        if not grads:
            continue
        total = grads[0]
        for other in grads[1:]:
            total.add_(other)
        if _BANK_GROUP is not None:
            dist.all_reduce(total, group=_BANK_GROUP)
        for other in grads[1:]:
            other.copy_(total)


def finalize_model_grads_with_bank(model: list[torch.nn.Module], num_tokens: torch.Tensor | None = None,
                                   pg_collection=None, force_all_reduce: bool | None = False) -> None:
    """megatron-core's ``finalize_model_grads``, then the bank-group all-reduce of the bank gradients."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    allreduce_bank_grads(model)


def destroy_bank_groups() -> None:
    """Forget the bank group (its process group is destroyed with the world)."""
    global _BANK_GROUP, _BANK_GROUP_RANKS
    _BANK_GROUP, _BANK_GROUP_RANKS = None, ()
