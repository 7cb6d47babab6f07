"""The optimizer: megatron-core's ``get_megatron_optimizer`` with backbone, memory-layer and bank groups.

Every parameter belongs to one role (:func:`param_role`):

- ``bank``: the memory bank (``memory_bank.*`` shared by the memory layers, or a layer's ``own_bank``);
- ``memory``: the rest of a memory layer's memory read (``cross_attention.*``: W_Q/W_K/W_V/W_O, the
  router and the memory norms) and its ``pre_cross_attn_layernorm``;
- ``backbone``: everything else.

Memory and bank get their own peak LR through megatron's ``config_overrides`` (``max_lr``; ``min_lr``
scaled by the same ratio as the peak), and their own weight decay (``wd_mult``: the role's weight decay over
``--weight-decay``; biases and 1-D parameters keep megatron's no-decay rule). ``lr_mult`` carries the LR
ratio too: megatron's scheduler does not read it, but megatron matches checkpointed param groups by
``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``, so groups with different LRs must differ in it
to be restored to the right group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

BACKBONE, MEMORY, BANK = "backbone", "memory", "bank"

_BANK_RE = re.compile(r"(^|\.)(memory_bank|own_bank)\.")
_MEMORY_RE = re.compile(r"(^|\.)(cross_attention|pre_cross_attn_layernorm)\.")


def param_role(name: str) -> str:
    """``bank``, ``memory`` or ``backbone`` for a parameter name (wrapper prefixes are fine)."""
    if _BANK_RE.search(name):
        return BANK
    if _MEMORY_RE.search(name):
        return MEMORY
    return BACKBONE


def role_lrs(lr: float, min_lr: float, memory_lr: float | None,
             bank_lr: float | None) -> dict[str, tuple[float, float]]:
    """``role -> (max_lr, min_lr)``; a role's minimum LR keeps the backbone's min/max ratio."""
    ratio = min_lr / lr if lr > 0 else 0.0
    out = {BACKBONE: (lr, min_lr)}
    for role, peak in ((MEMORY, memory_lr), (BANK, bank_lr)):
        peak = lr if peak is None else peak
        out[role] = (peak, peak * ratio)
    return out


def lr_overrides(lr: float, min_lr: float, memory_lr: float | None,
                 bank_lr: float | None) -> dict[ParamKey, ParamGroupOverride]:
    """megatron ``config_overrides`` giving the memory layers and the bank their own learning rates."""
    overrides: dict[ParamKey, ParamGroupOverride] = {}
    for role, (peak, low) in role_lrs(lr, min_lr, memory_lr, bank_lr).items():
        if role == BACKBONE or peak == lr:
            continue
        predicate = ParamWithNamePredicate(name=f"moc_{role}", fn=lambda _p, n, r=role: param_role(n) == r)
        overrides[ParamKey(with_name_predicate=predicate)] = ParamGroupOverride(
            max_lr=peak, min_lr=low, lr_mult=peak / lr if lr > 0 else 1.0)
    return overrides


def wd_overrides(weight_decay: float, memory_weight_decay: float | None,
                 bank_weight_decay: float | None) -> dict[ParamKey, ParamGroupOverride]:
    """megatron ``config_overrides`` giving the memory layers' matrices and the bank their own weight decay, as a
    multiple of ``weight_decay`` (so a ``--start/--end-weight-decay`` schedule scales by the same ratio)."""
    overrides: dict[ParamKey, ParamGroupOverride] = {}
    for role, decay in ((MEMORY, memory_weight_decay), (BANK, bank_weight_decay)):
        if decay is None or decay == weight_decay:
            continue
        if weight_decay <= 0:
            raise ValueError(f"a {role} weight decay of {decay} needs --weight-decay > 0 (it scales it)")

        def decays(param: torch.nn.Parameter, name: str, r: str = role) -> bool:
            return param_role(name) == r and param.dim() > 1 and not name.endswith(".bias")

        predicate = ParamWithNamePredicate(name=f"moc_{role}_wd", fn=decays)
        overrides[ParamKey(with_name_predicate=predicate)] = ParamGroupOverride(wd_mult=decay / weight_decay)
    return overrides


def freeze_bank(model_chunks: Sequence[torch.nn.Module]) -> int:
    """``requires_grad=False`` on every bank parameter (before DDP wrapping); returns how many."""
    frozen = 0
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param_role(name) == BANK:
                param.requires_grad_(False)
                frozen += 1
    return frozen


def build_optimizer(model_chunks: list[torch.nn.Module], config: OptimizerConfig, memory_lr: float | None = None,
                    bank_lr: float | None = None, memory_weight_decay: float | None = None,
                    bank_weight_decay: float | None = None) -> MegatronOptimizer:
    """megatron's optimizer over DDP-wrapped chunks, with the standard weight-decay skips (biases and
    1-D parameters) and the memory/bank learning-rate and weight-decay groups."""
    overrides = get_standard_config_overrides(config)
    overrides.update(lr_overrides(config.lr, config.min_lr, memory_lr, bank_lr))
    overrides.update(wd_overrides(config.weight_decay, memory_weight_decay, bank_weight_decay))
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def param_group_summary(optimizer: MegatronOptimizer, model_chunks: Sequence[torch.nn.Module]) -> list[dict]:
    """One entry per optimizer param group: its roles, parameter count, max/min LR, weight-decay mult."""
    names = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            names[id(param)] = name
    summary = []
    for group in optimizer.param_groups:
        roles = sorted({param_role(names[id(p)]) for p in group["params"] if id(p) in names})
        summary.append(dict(roles=roles, params=len(group["params"]), max_lr=group["max_lr"],
                            min_lr=group["min_lr"], wd_mult=group["wd_mult"],
                            expert=group["is_expert_parallel"]))
    return summary
