"""Moves routing units' queries to the ranks that own their chapters, and the results back.

Knows nothing of attention: it ships ``[n, ...]`` tensors of units to owner ranks and merges what
comes back with :func:`merge_partials`. Two dispatchers, chosen once by :func:`make_dispatcher`, with the same
two calls, so the memory layer runs route -> dispatch -> read -> combine whatever the layout:

- :class:`LocalDispatcher` (expert-model-parallel size 1): every chapter is on this rank, nothing moves; each
  unit is one row that reads its shared and routed chapters at once, and ``combine`` has nothing to merge;
- :class:`AllToAllDispatcher`: routed chapters are split over the expert-parallel group, units travel by
  all-to-all; the rows to read here are the received copies (their routed chapters on this rank) followed by
  this rank's own units (their shared chapters, which every rank holds), and ``combine`` sends the received
  rows' partials back and merges every unit's partials.

``dispatch()`` returns the rows to read together with a frozen :class:`DispatchPlan`; ``combine()`` takes that
plan back, so a dispatcher holds no state between the two calls.
:func:`all_to_all_bytes` counts what a plan's all-to-alls send, from the plan alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all

from moc_megatron.memory.chapter_attention import merge_partials

COUNT_BYTES = 8
"""Bytes of one all-to-all count (int64)."""


@dataclass(frozen=True)
class DispatchPlan:
    """Where every unit went: what :meth:`AllToAllDispatcher.combine` needs to bring results back."""

    unit_index: torch.Tensor
    """``[m]`` local index of each sent unit copy, ordered by destination rank."""
    send_splits: tuple[int, ...]
    """Unit copies sent to each rank of the expert-parallel group."""
    recv_splits: tuple[int, ...]
    """Unit copies received from each rank."""
    num_units: int
    """Units on this rank before dispatch."""
    rank: int = 0
    """This rank in the expert-parallel group."""
    own_rows: bool = False
    """The rows read here end with this rank's own units (their shared chapters), merged in ``combine``."""

    @property
    def merges(self) -> bool:
        """Whether a unit's result is merged from partials (log-sum-exps needed): under expert parallelism."""
        return self.ep_size > 1

    @property
    def ep_size(self) -> int:
        """Size of the expert-parallel group the plan spans."""
        return len(self.send_splits)

    @property
    def units_sent(self) -> int:
        """Unit copies sent to other ranks (the copy to this rank is a local one)."""
        return sum(self.send_splits) - self.send_splits[self.rank]

    @property
    def units_received(self) -> int:
        """Unit copies received from other ranks."""
        return sum(self.recv_splits) - self.recv_splits[self.rank]


@dataclass(frozen=True)
class Dispatched:
    """The rows this rank reads, and the plan that returns their results."""

    query: torch.Tensor
    """``[m, u, h, e]`` queries of the rows."""
    local_chapters: torch.Tensor
    """``[m, k]`` indices into this rank's routed chapters, ``-1`` where a chapter lives elsewhere (or is not
    read in this row)."""
    weights: torch.Tensor
    """``[m, S + k]`` chapter weights: the shared chapters' (zero in rows that do not read them), the routed."""
    reads_shared: torch.Tensor
    """``[m]`` bool: the row reads the shared chapters."""
    plan: DispatchPlan
    sent_weights: torch.Tensor | None = None
    """``[m_r, k]`` the routed weights as they travelled (``None``: nothing travelled)."""


def _merge(plan: DispatchPlan, out: torch.Tensor, lse: torch.Tensor | None,
           extra: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """Merge the partials in ``out``/``lse`` (rows in ``plan.unit_index`` order) and ``extra`` per unit."""
    unit_index = plan.unit_index
    if extra is not None:
        extra_out, extra_lse = extra
        unit_index = torch.cat([unit_index, torch.arange(plan.num_units, device=unit_index.device)])
        out = torch.cat([out, extra_out])
        lse = None if lse is None else torch.cat([lse, extra_lse])
    return merge_partials(out, lse, unit_index, plan.num_units)


def route_to_owners(chapters: torch.Tensor, chapters_per_rank: int, ep_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which unit copies go where, without communication: ``(unit_index [m], dest [m], local [m, k])``.

    A unit ``[k]`` global chapters is copied once to every rank owning one of them; copies are ordered by
    destination rank; ``local`` holds each copy's indices into its destination's chapters (``-1``: elsewhere).
    """
    owner = torch.div(chapters, chapters_per_rank, rounding_mode="floor")
    local = chapters - owner * chapters_per_rank
    # unit_to_rank[n, r]: unit n has a chapter on rank r.
    ranks = torch.arange(ep_size, device=chapters.device)
    unit_to_rank = (owner.unsqueeze(-1) == ranks).any(dim=1)  # [n, ep]
    dest, unit_index = unit_to_rank.t().nonzero(as_tuple=True)
    sent_local = torch.where(owner[unit_index] == dest.unsqueeze(-1), local[unit_index], -1)
    return unit_index, dest, sent_local


class LocalDispatcher:
    """Expert-model-parallel size 1: every routed chapter is on this rank; nothing is communicated."""

    def dispatch(self, query: torch.Tensor, chapters: torch.Tensor, weights: torch.Tensor,
                 num_shared: int) -> Dispatched:
        """Every unit stays here as one row reading its shared and routed chapters; global indices are local."""
        n = query.shape[0]
        plan = DispatchPlan(torch.arange(n, device=query.device), (n,), (n,), n)
        reads_shared = torch.full((n,), num_shared > 0, dtype=torch.bool, device=query.device)
        return Dispatched(query, chapters, weights, reads_shared, plan)

    def combine(self, plan: DispatchPlan, out: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor:
        """Every row is its unit's whole read: nothing to merge."""
        return out


class AllToAllDispatcher:
    """Expert-parallel dispatch of routing units to the owners of their routed chapters.

    Routed chapters are split into ``ep_size`` contiguous blocks of ``chapters_per_rank``. A unit is
    sent once to every rank that owns at least one of its chapters (not once per chapter); its shared
    chapters are read on its own rank.
    """

    def __init__(self, chapters_per_rank: int, group: dist.ProcessGroup, ep_size: int, ep_rank: int) -> None:
        self.chapters_per_rank = chapters_per_rank
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank

    def dispatch(self, query: torch.Tensor, chapters: torch.Tensor, weights: torch.Tensor,
                 num_shared: int) -> Dispatched:
        """Send ``query [n, u, h, e]`` with its global routed ``chapters [n, k]`` and routed ``weights[:, S:]``;
        the rows to read here are the copies received, then (with shared chapters) this rank's own units."""
        n, k = chapters.shape
        unit_index, dest, sent_local = route_to_owners(chapters, self.chapters_per_rank, self.ep_size)
        send_counts = torch.bincount(dest, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        plan = DispatchPlan(unit_index, tuple(send_splits), tuple(recv_splits), n, self.ep_rank, num_shared > 0)

        recv_local = sent_local.new_empty((sum(recv_splits), sent_local.shape[1]))
        dist.all_to_all_single(recv_local, sent_local, recv_splits, send_splits, group=self.group)
        recv_query = all_to_all(self.group, query[unit_index].contiguous(), recv_splits, send_splits)
        routed_w = weights[:, num_shared:]
        recv_weights = all_to_all(self.group, routed_w[unit_index].contiguous(), recv_splits, send_splits)
        m = recv_query.shape[0]
        rows_weights = torch.cat([recv_weights.new_zeros(m, num_shared), recv_weights], dim=1)
        reads_shared = torch.zeros(m, dtype=torch.bool, device=query.device)
        if num_shared:
            recv_query = torch.cat([recv_query, query])
            recv_local = torch.cat([recv_local, recv_local.new_full((n, k), -1)])
            own_weights = torch.cat([weights[:, :num_shared], weights.new_zeros(n, k)], dim=1)
            rows_weights = torch.cat([rows_weights, own_weights])
            reads_shared = torch.cat([reads_shared, torch.ones(n, dtype=torch.bool, device=query.device)])
        return Dispatched(recv_query, recv_local, rows_weights, reads_shared, plan, recv_weights)

    def combine(self, plan: DispatchPlan, out: torch.Tensor, lse: torch.Tensor | None) -> torch.Tensor:
        """Return the received rows' partial results to their senders and merge every unit's partials (with its
        own shared-chapter row) in the exact log-sum-exp combination."""
        received = sum(plan.recv_splits)
        send, recv = list(plan.send_splits), list(plan.recv_splits)
        extra = (out[received:], None if lse is None else lse[received:]) if plan.own_rows else None
        back = all_to_all(self.group, out[:received].contiguous(), send, recv)
        back_lse = None if lse is None else all_to_all(self.group, lse[:received].contiguous(), send, recv)
        return _merge(plan, back, back_lse, extra)


def make_dispatcher(num_routed_chapters: int, ep_rank: int, ep_size: int,
                    group: dist.ProcessGroup | None) -> LocalDispatcher | AllToAllDispatcher:
    """The local dispatcher at expert-model-parallel size 1, the all-to-all one above."""
    if ep_size == 1:
        return LocalDispatcher()
    if group is None:
        raise ValueError(f"expert-model-parallel size {ep_size} needs an expert-parallel process group")
    return AllToAllDispatcher(num_routed_chapters // ep_size, group, ep_size, ep_rank)


@dataclass(frozen=True)
class CommBytes:
    """Bytes this rank sends to other ranks in one memory read's all-to-alls."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        """Forward plus backward."""
        return self.forward + self.backward

    def __add__(self, other: CommBytes) -> CommBytes:
        return CommBytes(self.forward + other.forward, self.backward + other.backward)


def _row_bytes(t: torch.Tensor | None) -> int:
    """Bytes of one row (dim 0) of ``t``; 0 for ``None``."""
    return 0 if t is None else math.prod(t.shape[1:]) * t.element_size()


def all_to_all_bytes(sent: Dispatched, out: torch.Tensor, lse: torch.Tensor | None) -> CommBytes:
    """What :class:`AllToAllDispatcher` sends to other ranks for ``sent`` and the partials ``out``/``lse`` of its
    rows (the received copies first).

    Computed from the plan, with no communication. Per unit copy sent to another rank (``m_s``) and per
    copy received from one (``m_r``), with ``k`` the top-k and the row sizes of the tensors in bytes:

    - forward:  ``(P - 1) * 8`` (the counts) ``+ m_s * (8k + q + w) + m_r * (o + l)``
    - backward: ``m_r * (q + w) + m_s * (o + l)`` (gradients of what came in travel back)

    ``q`` is one unit's query (``unit_len * heads * head_dim * bytes``), ``w`` its ``k`` routed weights,
    ``o``/``l`` one unit's partial output and log-sum-exp (``l = 0`` for mixture gating). A backward
    term is counted only where the tensor requires a gradient. Rows a rank sends to itself are local
    copies and are not counted; the local dispatcher sends nothing.
    """
    plan = sent.plan
    if plan.ep_size == 1:
        return CommBytes()
    m_s, m_r = plan.units_sent, plan.units_received
    idx, q, w = _row_bytes(sent.local_chapters), _row_bytes(sent.query), _row_bytes(sent.sent_weights)
    o, lrow = _row_bytes(out), _row_bytes(lse)
    forward = (plan.ep_size - 1) * COUNT_BYTES + m_s * (idx + q + w) + m_r * (o + lrow)

    def grad(t: torch.Tensor | None, row: int) -> int:
        return row if t is not None and t.requires_grad else 0

    backward = m_r * (grad(sent.query, q) + grad(sent.sent_weights, w)) + m_s * (grad(out, o) + grad(lse, lrow))
    return CommBytes(forward, backward)
