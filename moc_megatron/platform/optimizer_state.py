"""Adaptations of megatron-core's optimizer checkpointing to a build without Transformer Engine or Apex.

Written for megatron-core 0.16.1 and tested on every supported release (``megatron_versions.check_supported``
warns, once, outside them); they
apply on every platform that lacks TE/Apex, so on a CPU always. ``training/checkpointing.py`` calls:

- :func:`initialize_optimizer_state` before a distributed-optimizer load (megatron's
  ``DistributedOptimizer.state_dict`` needs one common Adam ``step`` per parameter);
- :func:`allow_empty_distributed_optimizers` before building the optimizer's sharded state (a rank
  whose stage holds no bank still has an empty expert-parameter optimizer);
- :func:`restore_distributed_optimizer_steps` after a distributed-optimizer load (0.16.1 copies the
  load template's per-parameter ``step`` over the loaded one).
"""

from __future__ import annotations

import types

import torch
from megatron.core.optimizer import MegatronOptimizer

from moc_megatron.platform.megatron_versions import check_supported


def _sub_optimizers(optimizer: MegatronOptimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def initialize_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a fresh torch Adam state (``step`` included) to every parameter before a distributed-
    optimizer load: without TE/Apex megatron's ``DistributedOptimizer.state_dict`` needs one common step."""
    check_supported()
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] = torch.tensor(0.0)


def _empty_optimizer_state_dict(self) -> dict:
    """``DistributedOptimizer.state_dict`` for a rank whose optimizer holds no parameter, with the Adam step
    of the rank's other optimizers (``fully_reshardable`` stores rank 0's param groups for every rank)."""
    inner = self.optimizer.state_dict()
    state = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
    for group in state["optimizer"]["param_groups"]:
        del group["params"]
        group["step"] = self.moc_chain_step  # megatron needs one common value
    if self.grad_scaler:
        state["grad_scaler"] = self.grad_scaler.state_dict()
    return state


def allow_empty_distributed_optimizers(optimizer: MegatronOptimizer) -> None:
    """Let a distributed optimizer without parameters on this rank be checkpointed.

    Without TE/Apex megatron's ``DistributedOptimizer.state_dict`` reads the Adam step from the
    parameters' state and asserts there is exactly one; a rank whose stage holds no bank still has the
    (empty) expert-parameter optimizer, because megatron aligns param groups across ranks.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    check_supported()
    subs = _sub_optimizers(optimizer)
    steps = [float(state["step"]) for sub in subs if getattr(sub, "optimizer", None) is not None
             for state in sub.optimizer.state.values() if "step" in state]
    for sub in subs:
        inner = getattr(sub, "optimizer", None)
        if isinstance(sub, DistributedOptimizer) and inner is not None and \
                not any(group["params"] for group in inner.param_groups):
            sub.moc_chain_step = max(steps, default=0.0)
            sub.state_dict = types.MethodType(_empty_optimizer_state_dict, sub)


def restore_distributed_optimizer_steps(optimizer: MegatronOptimizer, loaded: dict) -> None:
    """megatron 0.16.1 copies the load template's per-parameter ``step`` over the loaded one; take it
    from the loaded param groups instead."""
    check_supported()
    subs = _sub_optimizers(optimizer)
    parts = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    for sub, part in zip(subs, parts):
        groups = part.get("optimizer", {}).get("param_groups", [])
        steps = [g["step"] for g in groups if g.get("step") is not None]
        if steps and getattr(sub, "optimizer", None) is not None:
            for state in sub.optimizer.state.values():
                state["step"] = torch.tensor(float(steps[0]))
