"""Router losses through megatron-core's MoE aux-loss machinery, and chapter-load statistics.

The chapter-load counts themselves live on each router (:meth:`ChapterRouter.compute_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    switch_load_balancing_loss_func,
    z_loss_func,
)

from moc_megatron.config import MoCConfig
from moc_megatron.memory.router import Routing, router_loads
from moc_megatron.platform.megatron_versions import record_aux_loss

LOAD_BALANCE_NAME = "moc_load_balancing_loss"
Z_LOSS_NAME = "moc_z_loss"


def attach_router_losses(
    output: torch.Tensor, routing: Routing, config: MoCConfig, layer_number: int
) -> torch.Tensor:
    """Attach the load-balancing and z-losses to ``output``'s backward and log them.

    The losses' gradients enter through megatron's ``MoEAuxLossAutoScaler``, scaled like the LM
    loss (see :func:`set_aux_loss_scale`); their unscaled values go to megatron's aux-loss tracker.
    """
    num_routed = config.moc_num_routed_chapters
    num_units = routing.probs.shape[0]
    per_chapter = torch.bincount(routing.chapters.flatten(), minlength=num_routed)
    total = output.new_zeros((), dtype=torch.float32)
    if config.moc_load_balance_coeff > 0:
        lb = switch_load_balancing_loss_func(
            routing.probs, per_chapter, num_units, config.moc_top_k, num_routed, config.moc_load_balance_coeff
        )
        record_aux_loss(LOAD_BALANCE_NAME, lb / config.moc_load_balance_coeff, layer_number, config.num_layers)
        total = total + lb
    if config.moc_z_loss_coeff > 0:
        z = z_loss_func(routing.logits, config.moc_z_loss_coeff)
        record_aux_loss(Z_LOSS_NAME, z / config.moc_z_loss_coeff, layer_number, config.num_layers)
        total = total + z
    return MoEAuxLossAutoScaler.apply(output, total)


def set_aux_loss_scale(scale: torch.Tensor) -> None:
    """Scale of the aux losses' gradients; the training step sets ``loss_scale / num_microbatches``."""
    current = MoEAuxLossAutoScaler.main_loss_backward_scale
    if current is None or current.shape != scale.shape or current.device != scale.device:
        # megatron's autoscaler creates a 0-d default when a backward runs before any scale was set;
        # copy_() into it would fail on shape, so replace it.
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale.detach().clone()
    else:
        current.copy_(scale)


def pop_chapter_load(model: torch.nn.Module | Sequence[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """Return and reset the per-layer chapter selection counts of ``model``'s routers (tests and benches)."""
    return router_loads(model, reset=True)


def chapter_load_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Entropy of the load (nats and as a fraction of the uniform maximum) and the unused share."""
    total = counts.sum()
    if total <= 0:
        return {"entropy": 0.0, "normalized_entropy": 0.0, "unused_fraction": 1.0, "max_load": 0.0}
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    max_entropy = float(torch.log(torch.tensor(float(len(counts)))))
    return {
        "entropy": entropy,
        "normalized_entropy": entropy / max_entropy if max_entropy > 0 else 1.0,
        "unused_fraction": float((counts == 0).float().mean()),
        "max_load": float(p.max()),
    }
