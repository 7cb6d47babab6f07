"""Chapter-major chapter attention in plain PyTorch, for units with few queries (token and chunk routing).

A unit with one query reading its chapters one by one gives ``1 x T`` score tiles and copies each chapter's
keys/values once per unit. Here the (unit, slot) pairs are grouped by chapter instead (an inverted index, as
in MoE dispatch and the Triton kernel's chapter-major schedule): a *tile* is up to :data:`TILE_PAIRS` pairs
that read the same chapter, the chapter's K/V are loaded once per tile and the scores are one
``rows x T`` matmul. Each pair gets a partial result (normalised output and log-sum-exp over the chapter's
``T`` tokens); :class:`Accumulator` merges them into the units exactly. Tiles are sorted by size and taken in
groups padded to the group's largest tile, each group within an element budget.

Backward takes the *final* output and log-sum-exp of every unit (as flash attention's backward does), so a
block of chapters contributes its exact share of every gradient without the other blocks. Shapes as in
:func:`moc_megatron.memory.chapter_attention.chapter_attention`; ``selected`` holds indices into this
block's ``keys``/``values`` or ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_PAIRS = 64
"""At most this many (unit, slot) pairs of one chapter per tile (a chapter read more often gets several); fewer
when the pairs' rows (queries x heads) would pass the element budget."""


class Accumulator:
    """Running merge of partial reads into ``[n, u, h, e]`` outputs: exact log-sum-exp merge (paper) or a sum.

    Paper gating keeps the unnormalised output relative to a running maximum, like an online softmax over
    partials: ``o = sum_p exp(lse_p - m) o_p``, ``l = sum_p exp(lse_p - m)``; :meth:`result` divides.
    """

    def __init__(self, n: int, u: int, h: int, e: int, paper: bool, dtype: torch.dtype, device) -> None:
        self.paper = paper
        self.out = torch.zeros(n, u, h, e, dtype=dtype, device=device)
        if paper:
            self.peak = torch.full((n, u, h), float("-inf"), dtype=dtype, device=device)
            self.total = torch.zeros(n, u, h, dtype=dtype, device=device)

    def add(self, units: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        """Merge partials ``out [p, u, h, e]`` (``lse [p, u, h]``) of ``units [p]`` (repeats allowed)."""
        if not self.paper:
            self.out.index_add_(0, units, out.to(self.out.dtype))
            return
        lse = lse.to(self.out.dtype)
        index = units.view(-1, 1, 1).expand_as(lse)
        peak = self.peak.scatter_reduce(0, index, lse, "amax")
        safe = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
        alpha = torch.exp(self.peak - safe)  # 1 where untouched, 0 where it was -inf
        self.out.mul_(alpha.unsqueeze(-1))
        self.total.mul_(alpha)
        share = torch.exp(lse - safe[units])
        self.out.index_add_(0, units, out.to(self.out.dtype) * share.unsqueeze(-1))
        self.total.index_add_(0, units, share)
        self.peak = peak

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, lse)`` (``lse`` ``None`` for mixture); units with nothing read get zeros and ``-inf``."""
        if not self.paper:
            return self.out, None
        seen = self.total > 0
        out = torch.where(seen.unsqueeze(-1), self.out / self.total.clamp(min=torch.finfo(self.total.dtype).tiny)
                          .unsqueeze(-1), torch.zeros_like(self.out))
        lse = torch.where(seen, self.peak + torch.log(self.total.clamp(min=torch.finfo(self.total.dtype).tiny)),
                          torch.full_like(self.peak, float("-inf")))
        return out, lse


@dataclass
class _Group:
    """One padded group of tiles: ``pairs [tiles, rows]`` index the sorted pairs (``-1``: padding)."""

    chapter: torch.Tensor
    pairs: torch.Tensor


class ChapterPlan:
    """The inverted index of one block: valid (unit, slot) pairs sorted by chapter, cut into padded tile groups."""

    def __init__(self, selected: torch.Tensor, u: int, h: int, g: int, e: int, t: int, budget: int) -> None:
        valid = selected >= 0
        unit, slot = valid.nonzero(as_tuple=True)
        chapter = selected[unit, slot]
        order = torch.argsort(chapter, stable=True)
        self.unit, self.slot, chapter = unit[order], slot[order], chapter[order]
        self.groups: list[_Group] = []
        if chapter.numel() == 0:
            return
        c = int(selected.max()) + 1
        # Per tile row (one pair): scores, probabilities and their gradients (T each), query, output and
        # gradients (e each); plus the tile's K/V and their gradients. A tile holds as many pairs as fit the
        # budget, at most TILE_PAIRS (units of many queries get smaller tiles).
        per_row = u * h * (4 * t + 4 * e)
        per_tile_kv = 4 * t * g * e
        size = max(1, min(TILE_PAIRS, (budget - per_tile_kv) // per_row))
        counts = torch.bincount(chapter, minlength=c)
        starts = torch.cumsum(counts, 0) - counts
        tiles = (counts + size - 1) // size
        tile_chapter = torch.repeat_interleave(torch.arange(c, device=selected.device), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        j = torch.arange(tile_chapter.numel(), device=selected.device) - first_tile[tile_chapter]
        tile_start = starts[tile_chapter] + j * size
        tile_size = torch.clamp(counts[tile_chapter] - j * size, max=size)
        by_size = torch.argsort(tile_size, descending=True, stable=True)
        sizes = tile_size[by_size].tolist()
        i = 0
        while i < len(sizes):
            rows = sizes[i]
            count = max(1, budget // (rows * per_row + per_tile_kv))
            chosen = by_size[i : i + count]
            offsets = torch.arange(rows, device=selected.device)
            pairs = tile_start[chosen].unsqueeze(1) + offsets
            pairs = torch.where(offsets < tile_size[chosen].unsqueeze(1), pairs, -1)
            self.groups.append(_Group(tile_chapter[chosen], pairs))
            i += count


def _rows(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[tiles, rows, u, h, *tail]`` -> ``[tiles, g, r*rows*u, *tail]`` (query head ``j`` reads ``j // r``)."""
    tiles, rows, u, h = x.shape[:4]
    tail = x.shape[4:]
    x = x.reshape(tiles, rows, u, g, h // g, *tail)
    x = x.permute(0, 3, 4, 1, 2, *range(5, 5 + len(tail)))
    return x.reshape(tiles, g, (h // g) * rows * u, *tail)


def _unrows(x: torch.Tensor, rows: int, u: int, h: int) -> torch.Tensor:
    """Inverse of :func:`_rows`: ``[tiles, g, r*rows*u, *tail]`` -> ``[tiles * rows, u, h, *tail]``."""
    tiles, g = x.shape[:2]
    tail = x.shape[3:]
    x = x.reshape(tiles, g, h // g, rows, u, *tail)
    x = x.permute(0, 3, 4, 1, 2, *range(5, 5 + len(tail)))
    return x.reshape(tiles * rows, u, h, *tail)


def _pick(x: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """``x[index]`` along dim 0 with ``fill`` where ``index`` is ``-1``."""
    picked = x.index_select(0, index.clamp(min=0).flatten()).view(*index.shape, *x.shape[1:])
    pad = (index < 0).view(*index.shape, *([1] * (x.dim() - 1)))
    return picked.masked_fill(pad, fill)


def _operands(plan: ChapterPlan, grp: _Group, query, keys, values, weights, acc, scale):
    """Scaled queries ``[tiles, g, R, e]``, keys/values ``[tiles, g, T, e]``, row weights ``[tiles, 1, R, 1]``
    and the unit of every tile row ``[tiles, rows]`` (``-1`` on padding)."""
    g = keys.shape[2]
    u, h = query.shape[1], query.shape[2]
    unit = _pick(plan.unit, grp.pairs, -1)
    w = _pick(weights[plan.unit, plan.slot].to(acc), grp.pairs, 0.0)  # [tiles, rows]; 0 on padding
    qs = _rows(_pick(query, unit, 0.0).to(acc), g) * scale
    kt = keys.index_select(0, grp.chapter).to(acc).permute(0, 2, 1, 3)
    vt = values.index_select(0, grp.chapter).to(acc).permute(0, 2, 1, 3)
    wr = _rows(w.view(*grp.pairs.shape, 1, 1).expand(-1, -1, u, h), g)[:, :1].unsqueeze(-1)
    return qs, kt, vt, wr, unit


def chapter_major_forward(query, keys, values, selected, weights, gating: str, scale: float, budget: int,
                          into: Accumulator) -> None:
    """Add this block's partials of every unit into ``into`` (no autograd)."""
    n, u, h, e = query.shape
    g, t = keys.shape[2], keys.shape[1]
    acc = into.out.dtype
    plan = ChapterPlan(selected, u, h, g, e, t, budget)
    for grp in plan.groups:
        qs, kt, vt, wr, unit = _operands(plan, grp, query, keys, values, weights, acc, scale)
        s = torch.matmul(qs, kt.transpose(-1, -2))  # [tiles, g, R, T]
        rows = grp.pairs.shape[1]
        real = grp.pairs.flatten() >= 0
        if gating == "paper":
            s.mul_(wr)
            lse = torch.logsumexp(s, dim=-1)
            o = torch.matmul(s.sub_(lse.unsqueeze(-1)).exp_(), vt).mul_(wr)
            lse = _unrows(lse, rows, u, h)[real]
        else:
            o = torch.matmul(torch.softmax(s, dim=-1), vt).mul_(wr)
            lse = None
        into.add(unit.flatten()[real], _unrows(o, rows, u, h)[real], lse)


def chapter_major_backward(query, keys, values, selected, weights, out, lse, dout, delta, gating: str,
                           scale: float, budget: int, dq, dk, dv, dw) -> None:
    """Add this block's share of the gradients into ``dq [n,u,h,e]``, ``dk``/``dv [c,T,g,e]``, ``dw [n,k]``.

    ``out``/``lse`` are the units' final results; ``delta [n, u, h]`` is ``rowsum(out * dout) - dlse``
    (paper gating; unused for mixture).
    """
    n, u, h, e = query.shape
    g, t = keys.shape[2], keys.shape[1]
    acc = dq.dtype
    plan = ChapterPlan(selected, u, h, g, e, t, budget)
    for grp in plan.groups:
        qs, kt, vt, wr, unit = _operands(plan, grp, query, keys, values, weights, acc, scale)
        rows = grp.pairs.shape[1]
        do = _rows(_pick(dout, unit, 0.0).to(acc), g)
        su = torch.matmul(qs, kt.transpose(-1, -2))  # unweighted scores [tiles, g, R, T]
        dpu = torch.matmul(do, vt.transpose(-1, -2))  # unweighted dP
        if gating == "paper":
            # Padding rows read lse = +inf, so their probabilities are 0.
            row_lse = _rows(_pick(lse.to(acc), unit, float("inf")).unsqueeze(-1), g)
            row_delta = _rows(_pick(delta.to(acc), unit, 0.0).unsqueeze(-1), g)
            p = torch.exp(su * wr - row_lse)
            ds = p * (dpu * wr - row_delta)
            dw_rows = (ds * su + p * dpu).sum(-1)  # [tiles, g, R]
            dsw = ds * wr
        else:
            p = torch.softmax(su, dim=-1)
            delta_c = (p * dpu).sum(-1, keepdim=True)
            dsw = p * (dpu - delta_c) * wr
            dw_rows = delta_c.squeeze(-1)
        pw = p * wr
        real = grp.pairs.flatten() >= 0
        dqs = _unrows(torch.matmul(dsw, kt) * scale, rows, u, h)[real]
        dq.index_add_(0, unit.flatten()[real], dqs)
        dk.index_add_(0, grp.chapter, torch.matmul(dsw.transpose(-1, -2), qs).permute(0, 2, 1, 3).contiguous())
        dv.index_add_(0, grp.chapter, torch.matmul(pw.transpose(-1, -2), do).permute(0, 2, 1, 3).contiguous())
        pair_dw = _unrows(dw_rows.unsqueeze(-1), rows, u, h).sum(dim=(1, 2, 3))[real]  # [pairs here]
        pair = grp.pairs.flatten()[real]
        dw.index_put_((plan.unit[pair], plan.slot[pair]), pair_dw, accumulate=True)
