"""Chapter router: pools hidden states per routing unit and picks the top-k routed chapters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moc_megatron.config import MoCConfig
from moc_megatron.memory.units import RoutingUnits
from moc_megatron.platform import get_device


@dataclass
class Routing:
    """The router's decision for ``N`` routing units over ``R`` routed chapters."""

    logits: torch.Tensor
    """``[N, R]`` router logits (fp32)."""
    probs: torch.Tensor
    """``[N, R]`` softmax over all routed chapters."""
    chapters: torch.Tensor
    """``[N, k]`` global routed-chapter indices (0-based among routed chapters)."""
    topk_probs: torch.Tensor
    """``[N, k]`` probabilities of the selected chapters."""


def pool_routing_units(hidden: torch.Tensor, unit: str, chunk_size: int) -> torch.Tensor:
    """Router inputs, one row per routing unit, from ``hidden`` ``[s, b, h]`` (see :meth:`RoutingUnits.pool`)."""
    return RoutingUnits(unit, chunk_size).pool(hidden)


class ChapterRouter(nn.Module):
    """``softmax(W_r r + b_r)`` over the routed chapters, then top-k.

    The router weights are replicated on every tensor- and expert-parallel rank (dense parameters).
    The router also keeps its chapter-load statistics (as OLMo-core's MoE router does): ``chapter_load``
    counts how many routing units selected each routed chapter in the training forwards the memory layer
    passed to :meth:`record_load`, until :meth:`reset_metrics`. It is a non-persistent integer buffer: not in
    checkpoints, not cast by ``.half()``/``.bfloat16()``, moved with the module.
    """

    def __init__(self, config: MoCConfig, layer_number: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        """1-based number of the layer this router belongs to (the key of :func:`router_loads`)."""
        num_routed = config.moc_num_routed_chapters
        device = None if config.use_cpu_initialization else get_device()
        self.register_buffer("chapter_load", torch.zeros(num_routed, dtype=torch.long, device=device),
                             persistent=False)
        self.weight = nn.Parameter(
            torch.empty(num_routed, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(num_routed, dtype=config.params_dtype, device=device))
        if config.perform_initialization and not self.weight.is_meta:
            config.init_method(self.weight)

    def forward(self, unit_features: torch.Tensor) -> Routing:
        """Route ``[N, h]`` unit features; in at least fp32, like megatron's MoE router."""
        dtype = torch.promote_types(unit_features.dtype, torch.float32)
        logits = torch.nn.functional.linear(unit_features.to(dtype), self.weight.to(dtype), self.bias.to(dtype))
        probs = torch.softmax(logits, dim=-1)
        topk_probs, chapters = torch.topk(probs, self.config.moc_top_k, dim=-1)
        return Routing(logits=logits, probs=probs, chapters=chapters, topk_probs=topk_probs)

    def record_load(self, routing: Routing) -> None:
        """Add ``routing``'s selections to ``chapter_load`` (the memory layer calls it in training forwards)."""
        counts = torch.bincount(routing.chapters.detach().flatten(), minlength=self.chapter_load.numel())
        self.chapter_load += counts.to(self.chapter_load.device)

    def compute_metrics(self, reset: bool = False) -> torch.Tensor:
        """The chapter selection counts since the last reset, ``[num_routed]`` float64; optionally reset them."""
        counts = self.chapter_load.to(torch.float64)  # a copy: the buffer's dtype is long
        if reset:
            self.reset_metrics()
        return counts

    def reset_metrics(self) -> None:
        """Zero the chapter selection counts."""
        self.chapter_load.zero_()


def router_loads(model: nn.Module | Sequence[nn.Module], reset: bool = True) -> dict[int, torch.Tensor]:
    """Chapter loads of the routers in ``model`` (a module or model chunks), summed per layer number; optionally
    reset them. Routers without a layer number or without selections are left out."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    loads: dict[int, torch.Tensor] = {}
    for router in (m for chunk in chunks for m in chunk.modules() if isinstance(m, ChapterRouter)):
        counts = router.compute_metrics(reset=reset)
        if router.layer_number is None or not counts.any():
            continue
        counts = counts.cpu()
        loads[router.layer_number] = loads[router.layer_number] + counts if router.layer_number in loads else counts
    return loads


def chapter_weights(routing: Routing, config: MoCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the shared and the selected routed chapters, ``([N, S], [N, k])``.

    The top-k probabilities are renormalised to sum 1 and scaled by ``moc_routed_scaling_factor``;
    every shared chapter weighs 1; then all weights are renormalised to sum 1 (the paper's reference
    code: with 1 shared chapter and scaling 2.5 the shared chapter carries 1/3.5).
    """
    routed = routing.topk_probs / routing.topk_probs.sum(dim=-1, keepdim=True)
    routed = routed * config.moc_routed_scaling_factor
    n = routed.shape[0]
    shared = torch.ones(n, config.moc_num_shared_chapters, dtype=routed.dtype, device=routed.device)
    total = shared.sum(dim=-1, keepdim=True) + routed.sum(dim=-1, keepdim=True)
    return shared / total, routed / total
