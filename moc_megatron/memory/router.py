"""Chapter router: pools hidden states per routing unit and picks the top-k routed chapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moc_megatron.config import MoCConfig
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
    """Router inputs, one row per routing unit, from ``hidden`` ``[s, b, h]``.

    Returns ``[b * units_per_sequence, h]`` ordered sequence-major:
    - ``sequence``: the mean over the whole sequence (sees future tokens, as in the paper);
    - ``chunk``: chunk ``j`` is routed from the mean of the tokens before it (zeros for the first);
    - ``token``: every token's own hidden state.
    """
    s, b, h = hidden.shape
    x = hidden.transpose(0, 1)  # [b, s, h]
    if unit == "sequence":
        return x.mean(dim=1)
    if unit == "token":
        return x.reshape(b * s, h)
    if unit == "chunk":
        num_chunks = -(-s // chunk_size)
        prefix = torch.cumsum(x, dim=1)  # prefix[:, t] = sum of tokens 0..t
        starts = torch.arange(num_chunks, device=x.device) * chunk_size  # tokens before chunk j
        counts = starts.clamp(min=1).to(x.dtype).view(1, num_chunks, 1)
        before = prefix[:, (starts - 1).clamp(min=0)]  # sum of tokens 0..start-1
        before = torch.where((starts > 0).view(1, num_chunks, 1), before, torch.zeros_like(before))
        return (before / counts).reshape(b * num_chunks, h)
    raise ValueError(f"unknown routing unit {unit!r}")


class ChapterRouter(nn.Module):
    """``softmax(W_r r + b_r)`` over the routed chapters, then top-k.

    The router weights are replicated on every tensor- and expert-parallel rank (dense parameters).
    """

    def __init__(self, config: MoCConfig) -> None:
        super().__init__()
        self.config = config
        num_routed = config.moc_num_routed_chapters
        device = None if config.use_cpu_initialization else get_device()
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
