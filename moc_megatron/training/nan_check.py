"""Non-finite losses: stop naming the iteration (Megatron-LM's ``--check-for-nan-in-loss-and-grad``), or skip.

The check runs after forward/backward and before the optimizer step: the per-micro-batch loss sums of the
last pipeline stage are tested and the verdict is all-reduced over every rank, so all ranks agree. A
flagged step never reaches the optimizer (the weights and Adam moments stay as they were); the loop then
stops with :class:`NonFiniteLossError` naming the iteration, or with ``--skip-nan-loss-iterations``
counts the iteration as skipped and goes on. A non-finite gradient norm after a finite loss stops too
(that update has happened; the last checkpoint is the one to resume from).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moc_megatron import platform
from moc_megatron.errors import MoCError


class NonFiniteLossError(MoCError, RuntimeError):
    """The loss (or gradient norm) of an iteration is NaN or Inf."""


def local_losses_nonfinite(losses: list[dict]) -> bool:
    """Whether any micro-batch's reported loss on this rank is NaN/Inf (``False`` off the last stage)."""
    return any(not bool(torch.isfinite(value).all()) for item in losses for value in item.values())


def on_any_rank(flag: bool) -> bool:
    """All-reduce (MAX) a boolean over the whole world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=platform.get_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def nonfinite_loss_message(iteration: int, what: str = "loss") -> str:
    """The message of a stop: iteration, what was non-finite, and the flags that change the behaviour."""
    return (f"iteration {iteration}: the {what} is NaN or Inf; stopped before the optimizer step "
            "(resume from the last checkpoint, lower --lr, or pass --skip-nan-loss-iterations to skip such "
            "iterations; --no-check-for-nan-in-loss-and-grad turns the check off)") if what == "loss" else (
        f"iteration {iteration}: the {what} is NaN or Inf after a finite loss; the update was applied, resume "
        "from the last checkpoint (--no-check-for-nan-in-loss-and-grad turns the check off)")


def is_nonfinite(value: float | None) -> bool:
    """``value`` is a float and not finite."""
    return value is not None and not math.isfinite(value)
