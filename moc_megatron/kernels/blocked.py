"""Memory-bounded chapter attention in plain PyTorch: blocked online softmax, recomputation in backward.

The CPU path and the fallback for GPUs without Triton. Units and their selected chapters are visited in
blocks small enough that the gathered keys/values and scores of one block stay under a fixed element
budget; the output, the log-sum-exp and the gradients are the only tensors that grow with the number of
units (``O(tokens x width)``), plus the keys/values of the chapters with traffic that the caller passes in.
Backward recomputes each block's scores from the saved log-sum-exp (as flash attention does) instead of
keeping probabilities. (A read small enough to be one block goes through the fused SDPA instead: see
:data:`ONE_BLOCK_COPY_ELEMENTS`.) Shapes as in :func:`moc_megatron.memory.chapter_attention.chapter_attention`.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_ELEMENTS = 1 << 22
"""Element budget of one block's gathered K/V plus its scores (4 Mi elements: 16 MiB in fp32)."""

ONE_BLOCK_COPY_ELEMENTS = 1 << 24
"""When the read needs no log-sum-exp (the whole read, one process, paper gating) and all units' selected
K/V fit this many elements (64 MiB in fp32: sequence routing's few long units), ``chapter_attention`` reads
them as one block through the fused ``scaled_dot_product_attention`` (its flash kernel is itself a blocked
online softmax) instead of looping here."""


def block_sizes(n: int, u: int, h: int, g: int, e: int, k: int, t: int, budget: int) -> tuple[int, int]:
    """``(units, chapters)`` per block so that gathered K/V and scores of a block fit ``budget`` elements."""
    per_pair = t * (2 * g * e + 2 * h * u)  # keys + values, scores + probabilities of one (unit, chapter)
    kb = max(1, min(k, budget // max(per_pair, 1)))
    nb = max(1, min(n, budget // max(per_pair * kb, 1)))
    return nb, kb


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Block:
    """Gathered keys/values of one (unit block, chapter block), as ``[nb, g, kb*t, e]`` matmul operands."""

    def __init__(self, keys, values, index, w, valid, n0, n1, j0, j1, acc, weighted: bool):
        nb, kb = n1 - n0, j1 - j0
        t, g, e = keys.shape[1:]
        self.flat = index[n0:n1, j0:j1].reshape(-1)
        self.w = w[n0:n1, j0:j1]  # [nb, kb], 0 on empty slots
        self.valid = valid[n0:n1, j0:j1]
        self.all_valid = bool(self.valid.all())
        self.shape = (nb, kb, t, g, e)
        self.k = self._gather(keys, acc)
        self.v = self._gather(values, acc)
        if weighted:  # paper gating: keys and values of each chapter scaled by its weight
            self.kw, self.vw = self.k * self.key_weights(), self.v * self.key_weights()
        else:
            self.kw, self.vw = self.k, self.v * self.key_weights()

    def _gather(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        nb, kb, t, g, e = self.shape
        x = x.index_select(0, self.flat).view(nb, kb * t, g, e).to(acc)
        return x.transpose(1, 2).contiguous()  # [nb, g, kb*t, e]

    def key_weights(self) -> torch.Tensor:
        """``[nb, 1, kb*t, 1]``: each key's chapter weight."""
        return self.w.repeat_interleave(self.shape[2], dim=1).view(self.shape[0], 1, -1, 1)

    def key_mask(self) -> torch.Tensor:
        """``[nb, 1, 1, kb*t]``: ``True`` on keys of empty slots."""
        return ~self.valid.repeat_interleave(self.shape[2], dim=1).view(self.shape[0], 1, 1, -1)

    def scatter(self, grad: torch.Tensor, into: torch.Tensor) -> None:
        """Add a ``[nb, g, kb*t, e]`` gradient of the gathered rows into ``into [c, t, g, e]``."""
        nb, kb, t, g, e = self.shape
        # Empty slots point at chapter 0 with weight 0: their rows are exactly zero.
        into.index_add_(0, self.flat, grad.transpose(1, 2).reshape(nb * kb, t, g, e))

    def chapter_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[nb, g, kb*t, e]`` summed per chapter: ``[nb, kb]``."""
        nb, kb, t, g, e = self.shape
        return x.sum(dim=(1, 3)).view(nb, kb, t).sum(-1)


def _units(x: torch.Tensor, n0: int, n1: int, g: int, acc: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Rows of units ``n0:n1`` of ``[n, u, h, e]`` as ``[nb, g, r*u, e]`` (head-major within a key/value head)."""
    nb, u, h, e = x[n0:n1].shape
    y = x[n0:n1].to(acc).view(nb, u, g, h // g, e).permute(0, 2, 3, 1, 4).contiguous()
    y = y.view(nb, g, (h // g) * u, e)
    return y * scale if scale != 1.0 else y


def _from_rows(y: torch.Tensor, u: int, h: int) -> torch.Tensor:
    """Inverse of :func:`_units` for ``[nb, g, r*u, e]`` (or ``[nb, g, r*u]``)."""
    nb, g = y.shape[:2]
    tail = y.shape[3:]
    return y.view(nb, g, h // g, u, *tail).permute(0, 3, 1, 2, *range(4, 4 + len(tail))).reshape(nb, u, h, *tail)


def _mixture_probs(qs: torch.Tensor, blk: _Block) -> torch.Tensor:
    """Per-chapter softmax ``[nb, g, r*u, kb*t]`` of the (already scaled) queries over the block's keys."""
    nb, kb, t, g, e = blk.shape
    s = torch.matmul(qs, blk.k.transpose(-1, -2))
    return torch.softmax(s.view(*s.shape[:3], kb, t), dim=-1).view(s.shape)


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
        qs = _units(query, n0, n1, g, acc, scale)  # [nb, g, r*u, e]
        o = torch.zeros_like(qs)
        m = torch.full(qs.shape[:3], float("-inf"), dtype=acc, device=query.device)
        lsum = torch.zeros_like(m)
        for j0 in range(0, k, kb):
            blk = _Block(keys, values, index, w, valid, n0, n1, j0, min(k, j0 + kb), acc, gating == "paper")
            if gating == "paper":
                s = torch.matmul(qs, blk.kw.transpose(-1, -2))  # [nb, g, r*u, kb*t]
                if not blk.all_valid:
                    s.masked_fill_(blk.key_mask(), float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                alpha = torch.exp(m - m_safe)
                p = s.sub_(m_safe.unsqueeze(-1)).exp_()
                lsum = lsum * alpha + p.sum(-1)
                o = torch.addcmul(torch.matmul(p, blk.vw), o, alpha.unsqueeze(-1))
                m = m_new
            else:
                p = _mixture_probs(qs, blk)
                o = o + torch.matmul(p, blk.vw)
        if gating == "paper":
            o = torch.where(lsum.unsqueeze(-1) > 0, o / lsum.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1), 0)
            lse[n0:n1] = _from_rows(m + torch.log(lsum), u, h)
        out[n0:n1] = _from_rows(o, u, h).to(query.dtype)
    return out, lse


def blocked_backward(query, keys, values, selected, weights, out, lse, dout, dlse, gating, scale, budget):
    """Gradients of query, keys, values and weights, recomputing every block's probabilities.

    ``dlse`` (or ``None``) is the gradient reaching the log-sum-exp, as it does through the
    expert-parallel merge: since ``d lse / d s = p`` it enters as ``delta - dlse``.
    """
    n, u, h, e = query.shape
    k = selected.shape[1]
    c, t, g = keys.shape[0], keys.shape[1], keys.shape[2]
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
        qs = _units(query, n0, n1, g, acc, scale)
        do = _units(dout, n0, n1, g, acc)
        dqs = torch.zeros_like(qs)
        if gating == "paper":
            row_lse = _units(lse.unsqueeze(-1), n0, n1, g, acc).squeeze(-1)  # [nb, g, r*u]
            # A row with nothing selected: exp(s - inf) = 0.
            row_lse = torch.where(torch.isinf(row_lse), torch.full_like(row_lse, float("inf")), row_lse)
            delta = (out[n0:n1].to(acc) * dout[n0:n1].to(acc)).sum(-1)
            if dlse is not None:
                delta = delta - dlse[n0:n1].to(acc)
            delta = _units(delta.unsqueeze(-1), 0, n1 - n0, g, acc)  # [nb, g, r*u, 1]
        for j0 in range(0, k, kb):
            j1 = min(k, j0 + kb)
            blk = _Block(keys, values, index, w, valid, n0, n1, j0, j1, acc, gating == "paper")
            if gating == "paper":
                p = torch.matmul(qs, blk.kw.transpose(-1, -2)).sub_(row_lse.unsqueeze(-1)).exp_()
                if not blk.all_valid:
                    p.masked_fill_(blk.key_mask(), 0.0)
                dvw = torch.matmul(p.transpose(-1, -2), do)  # gradient of the weighted values
                ds = torch.matmul(do, blk.vw.transpose(-1, -2)).sub_(delta).mul_(p)
                del p
                dqs += torch.matmul(ds, blk.kw)
                dkw = torch.matmul(ds.transpose(-1, -2), qs)  # gradient of the weighted keys
                dw[n0:n1, j0:j1] = blk.chapter_sum(dkw * blk.k + dvw * blk.v)
                kwt = blk.key_weights()
                blk.scatter(dkw * kwt, dk)
                blk.scatter(dvw * kwt, dv)
            else:
                p = _mixture_probs(qs, blk)  # [nb, g, r*u, kb*t]
                nb_, kb_, t_ = blk.shape[:3]
                dp = torch.matmul(do, blk.v.transpose(-1, -2))
                delta_c = (p * dp).view(*p.shape[:3], kb_, t_).sum(-1, keepdim=True)  # do . o_c per chapter
                wc = blk.w.view(nb_, 1, 1, kb_, 1)
                ds = (dp.view(*p.shape[:3], kb_, t_) - delta_c).mul_(p.view(*p.shape[:3], kb_, t_)).mul_(wc)
                ds = ds.view(p.shape)
                dqs += torch.matmul(ds, blk.k)
                blk.scatter(torch.matmul(ds.transpose(-1, -2), qs), dk)
                blk.scatter(torch.matmul((p.view(*p.shape[:3], kb_, t_) * wc).view(p.shape).transpose(-1, -2), do),
                            dv)
                dw[n0:n1, j0:j1] = delta_c.squeeze(-1).sum(dim=(1, 2))
        dq[n0:n1] = _from_rows(dqs * scale, u, h)
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
