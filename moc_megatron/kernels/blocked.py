"""Memory-bounded chapter attention in plain PyTorch: blocked online softmax, recomputation in backward.

The CPU path and the fallback for GPUs without Triton. Units and their selected chapters are visited in
blocks small enough that the gathered keys/values and scores of one block stay under a fixed element
budget; the output, the log-sum-exp and the gradients are the only tensors that grow with the number of
units (``O(tokens x width)``), plus the keys/values of the chapters with traffic that the caller passes in.
Backward recomputes each block's scores from the saved log-sum-exp (as flash attention does) instead of
keeping probabilities. Shapes as in :func:`moc_megatron.memory.chapter_attention.chapter_attention`.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_ELEMENTS = 1 << 22
"""Element budget of one block's gathered K/V plus its scores (4 Mi elements: 16 MiB in fp32)."""


def block_sizes(n: int, u: int, h: int, g: int, e: int, k: int, t: int, budget: int) -> tuple[int, int]:
    """``(units, chapters)`` per block so that gathered K/V and scores of a block fit ``budget`` elements."""
    per_pair = t * (2 * g * e + 2 * h * u)  # keys + values, scores + probabilities of one (unit, chapter)
    kb = max(1, min(k, budget // max(per_pair, 1)))
    nb = max(1, min(n, budget // max(per_pair * kb, 1)))
    return nb, kb


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Block:
    """Gathered keys/values and weights of one (unit block, chapter block)."""

    def __init__(self, keys, values, index, w, valid, n0, n1, j0, j1, acc):
        nb, kb = n1 - n0, j1 - j0
        t, g, e = keys.shape[1:]
        flat = index[n0:n1, j0:j1].reshape(-1)
        self.flat = flat
        self.k = keys.index_select(0, flat).view(nb, kb * t, g, e).to(acc)
        self.v = values.index_select(0, flat).view(nb, kb * t, g, e).to(acc)
        self.w = w[n0:n1, j0:j1]  # [nb, kb], 0 on empty slots
        self.valid = valid[n0:n1, j0:j1]
        self.wk = self.w.repeat_interleave(t, dim=1)  # [nb, kb*t]
        self.key_valid = self.valid.repeat_interleave(t, dim=1)
        self.shape = (nb, kb, t, g, e)


def _paper_scores(q: torch.Tensor, blk: _Block, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted ``scale * q.k`` ``[nb, g, r, u, m]`` and the weighted, masked scores."""
    raw = torch.einsum("nugre,nmge->ngrum", q, blk.k) * scale
    s = raw * blk.wk.view(raw.shape[0], 1, 1, 1, -1)
    s = s.masked_fill(~blk.key_valid.view(raw.shape[0], 1, 1, 1, -1), float("-inf"))
    return raw, s


def _mixture_probs(q: torch.Tensor, blk: _Block, scale: float) -> torch.Tensor:
    """Per-chapter softmax ``[nb, g, r, u, kb, t]``."""
    nb, kb, t, g, e = blk.shape
    s = torch.einsum("nugre,nmge->ngrum", q, blk.k) * scale
    return torch.softmax(s.view(*s.shape[:4], kb, t), dim=-1)


def blocked_forward(query, keys, values, selected, weights, gating, scale, budget):
    """Output ``[n, u, h, e]`` and, for paper gating, log-sum-exp ``[n, u, h]`` (else ``None``); no autograd."""
    n, u, h, e = query.shape
    k = selected.shape[1]
    c, t, g = keys.shape[0], keys.shape[1], keys.shape[2]
    acc = _acc_dtype(query.dtype)
    out = torch.zeros(n, u, h, e, dtype=query.dtype, device=query.device)
    lse = torch.full((n, u, h), float("-inf"), dtype=acc, device=query.device) if gating == "paper" else None
    if n == 0 or k == 0 or c == 0:
        return out, lse
    valid = selected >= 0
    index = selected.clamp(min=0)
    w = weights.to(acc) * valid
    nb, kb = block_sizes(n, u, h, g, e, k, t, budget)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        q = query[n0:n1].view(n1 - n0, u, g, h // g, e).to(acc)
        o = torch.zeros(n1 - n0, g, h // g, u, e, dtype=acc, device=query.device)
        if gating == "paper":
            m = torch.full((n1 - n0, g, h // g, u), float("-inf"), dtype=acc, device=query.device)
            lsum = torch.zeros_like(m)
        for j0 in range(0, k, kb):
            blk = _Block(keys, values, index, w, valid, n0, n1, j0, min(k, j0 + kb), acc)
            if gating == "paper":
                _, s = _paper_scores(q, blk, scale)
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe.unsqueeze(-1))
                lsum = lsum * alpha + p.sum(-1)
                pv = torch.einsum("ngrum,nmge->ngrue", p * blk.wk.view(n1 - n0, 1, 1, 1, -1), blk.v)
                o = o * alpha.unsqueeze(-1) + pv
                m = m_new
            else:
                p = _mixture_probs(q, blk, scale) * blk.w.view(n1 - n0, 1, 1, 1, -1, 1)
                nb_, kb_, t_, g_, e_ = blk.shape
                o = o + torch.einsum("ngrukt,nktge->ngrue", p, blk.v.view(nb_, kb_, t_, g_, e_))
        if gating == "paper":
            o = torch.where(lsum.unsqueeze(-1) > 0, o / lsum.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1), 0)
            lse[n0:n1] = (m + torch.log(lsum)).permute(0, 3, 1, 2).reshape(n1 - n0, u, h)
        out[n0:n1] = o.permute(0, 3, 1, 2, 4).reshape(n1 - n0, u, h, e).to(query.dtype)
    return out, lse


def blocked_backward(query, keys, values, selected, weights, out, lse, dout, dlse, gating, scale, budget):
    """Gradients of query, keys, values and weights, recomputing every block's probabilities.

    ``dlse`` (or ``None``) is the gradient reaching the log-sum-exp, as it does through the
    expert-parallel merge: since ``d lse / d s = p`` it enters as ``delta - dlse``.
    """
    n, u, h, e = query.shape
    k = selected.shape[1]
    c, t, g = keys.shape[0], keys.shape[1], keys.shape[2]
    r = h // g
    acc = _acc_dtype(query.dtype)
    dq = torch.zeros(n, u, h, e, dtype=acc, device=query.device)
    dk = torch.zeros(c, t, g, e, dtype=acc, device=query.device)
    dv = torch.zeros(c, t, g, e, dtype=acc, device=query.device)
    dw = torch.zeros(n, k, dtype=acc, device=query.device)
    if n == 0 or k == 0 or c == 0:
        return dq.to(query.dtype), dk.to(keys.dtype), dv.to(values.dtype), dw.to(weights.dtype)
    valid = selected >= 0
    index = selected.clamp(min=0)
    w = weights.to(acc) * valid
    nb, kb = block_sizes(n, u, h, g, e, k, t, budget)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        m_ = n1 - n0
        q = query[n0:n1].view(m_, u, g, r, e).to(acc)
        do = dout[n0:n1].view(m_, u, g, r, e).to(acc)
        dq_blk = torch.zeros(m_, u, g, r, e, dtype=acc, device=query.device)
        if gating == "paper":
            row_lse = lse[n0:n1].view(m_, u, g, r).permute(0, 2, 3, 1)  # [nb, g, r, u]
            row_lse = torch.where(torch.isinf(row_lse), torch.full_like(row_lse, float("inf")), row_lse)
            delta = (out[n0:n1].to(acc) * dout[n0:n1].to(acc)).sum(-1)
            if dlse is not None:
                delta = delta - dlse[n0:n1].to(acc)
            delta = delta.view(m_, u, g, r).permute(0, 2, 3, 1)
        for j0 in range(0, k, kb):
            j1 = min(k, j0 + kb)
            blk = _Block(keys, values, index, w, valid, n0, n1, j0, j1, acc)
            nb_, kb_, t_, g_, e_ = blk.shape
            if gating == "paper":
                raw, s = _paper_scores(q, blk, scale)
                wk = blk.wk.view(m_, 1, 1, 1, -1)
                p = torch.exp(s - row_lse.unsqueeze(-1))  # rows with nothing selected: exp(-inf) = 0
                dp_raw = torch.einsum("nugre,nmge->ngrum", do, blk.v)
                ds = p * (dp_raw * wk - delta.unsqueeze(-1))
                dsw = ds * wk * scale
                dq_blk += torch.einsum("ngrum,nmge->nugre", dsw, blk.k)
                dk_sel = torch.einsum("ngrum,nugre->nmge", dsw, q)
                dv_sel = torch.einsum("ngrum,nugre->nmge", p * wk, do)
                dw_key = (ds * raw + p * dp_raw).sum(dim=(1, 2, 3))  # [nb, kb*t]
                dw[n0:n1, j0:j1] = dw_key.view(m_, kb_, t_).sum(-1)
            else:
                p = _mixture_probs(q, blk, scale)  # [nb, g, r, u, kb, t]
                wc = blk.w.view(m_, 1, 1, 1, kb_, 1)
                v5 = blk.v.view(m_, kb_, t_, g, e)
                dp = torch.einsum("nugre,nktge->ngrukt", do, v5)
                delta_c = (p * dp).sum(-1, keepdim=True)  # do . o_c, per chapter
                ds = wc * p * (dp - delta_c) * scale
                dq_blk += torch.einsum("ngrukt,nktge->nugre", ds, blk.k.view(m_, kb_, t_, g, e))
                dk_sel = torch.einsum("ngrukt,nugre->nktge", ds, q).reshape(m_, kb_ * t_, g, e)
                dv_sel = torch.einsum("ngrukt,nugre->nktge", p * wc, do).reshape(m_, kb_ * t_, g, e)
                dw[n0:n1, j0:j1] = delta_c.squeeze(-1).sum(dim=(1, 2, 3))
            # Empty slots point at chapter 0 with weight 0: their rows of dk_sel/dv_sel are exactly zero.
            dk.index_add_(0, blk.flat, dk_sel.reshape(m_ * kb_, t_, g, e))
            dv.index_add_(0, blk.flat, dv_sel.reshape(m_ * kb_, t_, g, e))
        dq[n0:n1] = dq_blk.view(m_, u, h, e)
    dw = dw * valid
    return dq.to(query.dtype), dk.to(keys.dtype), dv.to(values.dtype), dw.to(weights.dtype)


class BlockedChapterAttention(torch.autograd.Function):
    """Autograd wrapper: saves inputs, output and log-sum-exp; backward recomputes block by block."""

    @staticmethod
    def forward(ctx, query, keys, values, selected, weights, gating, scale, budget):
        out, lse = blocked_forward(query, keys, values, selected, weights, gating, scale, budget)
        ctx.save_for_backward(query, keys, values, selected, weights, out, lse)
        ctx.gating, ctx.scale, ctx.budget = gating, scale, budget
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        query, keys, values, selected, weights, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dw = blocked_backward(query, keys, values, selected, weights, out, lse, dout.contiguous(),
                                          dlse, ctx.gating, ctx.scale, ctx.budget)
        return dq, dk, dv, None, dw, None, None, None


def blocked_chapter_attention(query, keys, values, selected, weights, gating: str, softmax_scale: float,
                              block_elements: int = DEFAULT_BLOCK_ELEMENTS):
    """Memory-bounded :func:`chapter_attention`: ``(out, lse)`` for paper gating, ``(out, None)`` for mixture.

    ``block_elements`` bounds the gathered keys/values plus scores held at once (at least one unit and
    one chapter per block, whatever the budget).
    """
    return BlockedChapterAttention.apply(query, keys, values, selected, weights, gating, softmax_scale,
                                         block_elements)
