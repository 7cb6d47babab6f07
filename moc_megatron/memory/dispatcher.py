"""Moves routing units' queries to the ranks that own their chapters, and the results back.

Knows nothing of attention: it ships ``[n, ...]`` tensors of units to owner ranks and merges what
comes back with :func:`merge_partials`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all

from moc_megatron.memory.chapter_attention import merge_partials


@dataclass
class Dispatched:
    """Units as the owner rank sees them."""

    query: torch.Tensor
    """``[m, u, h, e]`` queries of the received units."""
    local_chapters: torch.Tensor
    """``[m, k]`` indices into this rank's routed chapters, ``-1`` where a chapter lives elsewhere."""
    weights: torch.Tensor
    """``[m, k]`` chapter weights."""


class ChapterDispatcher:
    """Expert-parallel dispatch of routing units to the owners of their routed chapters.

    Routed chapters are split into ``ep_size`` contiguous blocks of ``chapters_per_rank``. A unit is
    sent once to every rank that owns at least one of its chapters (not once per chapter). With
    ``ep_size == 1`` nothing is communicated and the same code path runs.
    """

    def __init__(self, chapters_per_rank: int, group: dist.ProcessGroup | None, ep_size: int) -> None:
        self.chapters_per_rank = chapters_per_rank
        self.group = group
        self.ep_size = ep_size
        self._plan: tuple[torch.Tensor, list[int], list[int], int] | None = None

    def dispatch(self, query: torch.Tensor, chapters: torch.Tensor, weights: torch.Tensor) -> Dispatched:
        """Send ``query [n, u, h, e]`` with its global routed ``chapters [n, k]`` and ``weights``."""
        n = query.shape[0]
        owner = torch.div(chapters, self.chapters_per_rank, rounding_mode="floor")
        local = chapters - owner * self.chapters_per_rank
        if self.ep_size == 1:
            self._plan = (torch.arange(n, device=query.device), [n], [n], n)
            return Dispatched(query, local, weights)
        # unit_to_rank[n, r]: unit n has a chapter on rank r. Sends are ordered by destination rank.
        ranks = torch.arange(self.ep_size, device=chapters.device)
        unit_to_rank = (owner.unsqueeze(-1) == ranks).any(dim=1)  # [n, ep]
        dest, unit_index = unit_to_rank.t().nonzero(as_tuple=True)
        send_counts = torch.bincount(dest, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        self._plan = (unit_index, send_splits, recv_splits, n)

        sent_local = torch.where(owner[unit_index] == dest.unsqueeze(-1), local[unit_index], -1)
        recv_local = sent_local.new_empty((sum(recv_splits), sent_local.shape[1]))
        dist.all_to_all_single(recv_local, sent_local, recv_splits, send_splits, group=self.group)
        recv_query = all_to_all(self.group, query[unit_index].contiguous(), recv_splits, send_splits)
        recv_weights = all_to_all(self.group, weights[unit_index].contiguous(), recv_splits, send_splits)
        return Dispatched(recv_query, recv_local, recv_weights)

    def combine(
        self,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        extra: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Return the owners' partial results to the senders and merge them per unit.

        ``extra`` is a partial computed locally for every unit (the shared chapters); it is merged
        with the routed partials in the same exact log-sum-exp combination.
        """
        if self._plan is None:
            raise RuntimeError("combine() called before dispatch()")
        unit_index, send_splits, recv_splits, n = self._plan
        self._plan = None
        if self.ep_size > 1:
            out = all_to_all(self.group, out.contiguous(), send_splits, recv_splits)
            if lse is not None:
                lse = all_to_all(self.group, lse.contiguous(), send_splits, recv_splits)
        if extra is not None:
            extra_out, extra_lse = extra
            unit_index = torch.cat([unit_index, torch.arange(n, device=unit_index.device)])
            out = torch.cat([out, extra_out])
            lse = None if lse is None else torch.cat([lse, extra_lse])
        if self.ep_size == 1 and extra is None:
            return out
        return merge_partials(out, lse, unit_index, n)
