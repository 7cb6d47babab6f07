"""The fused Triton chapter attention: launches, the inverted index, partial merging and the autograd function.

Same contract as :func:`moc_megatron.memory.chapter_attention.chapter_attention` (``impl="triton"``).
Schedule (see :mod:`moc_megatron.kernels.triton_kernels`): units with at least ``UNIT_MAJOR_MIN_QUERIES``
queries (sequence, chunk routing) run unit-major: their own ``BM x T`` tiles are already tensor-core sized.
Units with fewer (token routing: one query each) run chapter-major: the (unit, slot) pairs are sorted by
chapter (an inverted index, like MoE dispatch), a tile holds ``BM`` rows of different units reading the same
chapter, each row gets one partial per chapter, and partials are merged exactly by their log-sum-exps.
Backward: dK/dV are always chapter-major (one program per chapter and key/value head walks the rows that
read it: deterministic, no atomics); dQ and the chapter-weight gradient come from the unit-major kernel
(many queries) or from the same chapter-major walk (token routing), summed on the host in a fixed order.
"""

from __future__ import annotations

import os

import torch
import triton

from moc_megatron.kernels import triton_kernels as kern

UNIT_MAJOR_MIN_QUERIES = 16
"""Units with at least this many queries run unit-major, fewer chapter-major."""

WRITE_DQ_STAGES = 2
WRITE_DQ_WARPS = 8
"""Software-pipelining depth and warps of the chapter-major backward when it also writes dQ (token routing):
with Triton's defaults (3 stages, 4 warps) it spills registers on sm_90, with 2 stages and 4 warps still 80 B
under Triton 3.7 (torch 2.13's pin); 2 stages and 8 warps spill nothing under 3.7 and 3.9
(``scripts/compile_kernels_sm90.py``)."""

LARGE_TILE = 64 * 128
"""Chapter tiles (``BT x BE``) above this run the chapter-major backward on 8 warps: with 4, its two fp32
accumulators alone need 256 registers per thread and spill (head dim 128 with chapters of 128 tokens)."""

MAX_PARTIAL_ELEMENTS = 1 << 27
"""Chapter-major runs take units in groups whose fp32 per-(row, slot) partials fit this many elements (512 MiB)."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(t: int, e: int) -> tuple[int, int, int]:
    bt = max(16, triton.next_power_of_2(t))
    be = max(16, triton.next_power_of_2(e))
    if bt > 128:
        raise ValueError(f"the Triton chapter attention takes chapters of at most 128 tokens, got {t}")
    bm = 64 if be <= 64 else 32
    if _interpreted():
        bm = 16  # interpreter cost grows with tile size far less than with program count: keep rows tight
    return bm, bt, be


def _options(dtype: torch.dtype) -> dict:
    upcast = dtype == torch.float32 or _interpreted()
    return dict(UPCAST=upcast, PREC="ieee" if upcast else "tf32")


class InvertedIndex:
    """The valid (unit, slot) pairs sorted by chapter, CSR offsets per chapter, and chapter-major tiles."""

    def __init__(self, selected: torch.Tensor, num_chapters: int, u: int, bm: int) -> None:
        flat = selected.reshape(-1)
        pairs = torch.nonzero(flat >= 0).squeeze(1)
        order = torch.argsort(flat[pairs], stable=True)
        self.pairs = pairs[order].contiguous()  # pair id = unit * k + slot
        self.count = torch.bincount(flat[self.pairs], minlength=num_chapters)
        self.offset = (torch.cumsum(self.count, 0) - self.count).contiguous()
        tiles = (self.count * u + bm - 1) // bm
        self.tile_chapter = torch.repeat_interleave(torch.arange(num_chapters, device=selected.device), tiles)
        first = torch.cumsum(tiles, 0) - tiles
        self.tile_start = ((torch.arange(self.tile_chapter.numel(), device=selected.device)
                            - first[self.tile_chapter]) * bm).contiguous()


def _forward_unit_major(q, keys, values, sel, w, gating, scale):
    n, u, h, e = q.shape
    c, t, g, _ = keys.shape
    bm, bt, be = _tiles(t, e)
    out = torch.empty_like(q)
    lse = torch.empty(n, u, h, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(u, bm), n * h)
    kern._fwd_unit_major[grid](q, keys, values, sel, w, out, lse, scale, u, h, g, sel.shape[1], t, e,
                               PAPER=gating == "paper", BM=bm, BT=bt, BE=be, **_options(q.dtype))
    return out, lse


def _forward_chapter_major(q, keys, values, sel, w, gating, scale):
    n, u, h, e = q.shape
    c, t, g, _ = keys.shape
    k = sel.shape[1]
    bm, bt, be = _tiles(t, e)
    index = InvertedIndex(sel, c, u, bm)
    rows = index.pairs.numel() * u
    part_o = torch.empty(rows, h, e, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(rows, h, dtype=torch.float32, device=q.device)
    if index.tile_chapter.numel():
        grid = (index.tile_chapter.numel(), h)
        kern._fwd_chapter_major[grid](q, keys, values, w, part_o, part_lse, index.tile_chapter, index.tile_start,
                                      index.offset, index.count, index.pairs, scale, u, h, g, k, t, e,
                                      PAPER=gating == "paper", BM=bm, BT=bt, BE=be, **_options(q.dtype))
    # Back to [n, k, u, h(, e)] by pair id (a permutation: deterministic), then merge over the k slots.
    full_o = q.new_zeros((n * k, u, h, e), dtype=torch.float32)
    full_o[index.pairs] = part_o.view(-1, u, h, e)
    full_o = full_o.view(n, k, u, h, e)
    if gating == "mixture":
        return full_o.sum(1).to(q.dtype), None
    full_lse = torch.full((n * k, u, h), float("-inf"), dtype=torch.float32, device=q.device)
    full_lse[index.pairs] = part_lse.view(-1, u, h)
    full_lse = full_lse.view(n, k, u, h)
    lse = torch.logsumexp(full_lse, dim=1)
    share = torch.exp(full_lse - torch.where(torch.isinf(lse), 0, lse).unsqueeze(1))
    return (full_o * share.unsqueeze(-1)).sum(1).to(q.dtype), lse


def _unit_groups(n: int, u: int, h: int, e: int, k: int, chapter_major: bool) -> list[tuple[int, int]]:
    """Unit ranges processed together (chapter-major partials are bounded by ``MAX_PARTIAL_ELEMENTS``)."""
    if not chapter_major:
        return [(0, n)]
    step = max(1, MAX_PARTIAL_ELEMENTS // max(1, k * u * h * e))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def triton_forward(q, keys, values, sel, w, gating, scale, chapter_major):
    """Output and (paper) log-sum-exp; inputs contiguous, ``w`` fp32 with zeros on empty slots."""
    n, u, h, e = q.shape
    fwd = _forward_chapter_major if chapter_major else _forward_unit_major
    outs, lses = [], []
    for a, b in _unit_groups(n, u, h, e, sel.shape[1], chapter_major):
        o, lse = fwd(q[a:b], keys, values, sel[a:b], w[a:b], gating, scale)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if gating == "mixture":
        return out, None
    return out, torch.cat(lses) if len(lses) > 1 else lses[0]


def triton_backward(q, keys, values, sel, w, out, lse, dout, dlse, gating, scale, chapter_major):
    """dQ, dK, dV (fp32) and the chapter-weight gradient ``[n, k]`` (fp32)."""
    n, u, h, e = q.shape
    c, t, g, _ = keys.shape
    k = sel.shape[1]
    bm, bt, be = _tiles(t, e)
    opts = _options(q.dtype)
    paper = gating == "paper"
    bwd_launch = dict(num_stages=WRITE_DQ_STAGES, num_warps=WRITE_DQ_WARPS) if chapter_major else {}
    if bt * be > LARGE_TILE:  # dK and dV accumulators of 128 x 128 fp32 each: 4 warps cannot hold them
        bwd_launch["num_warps"] = 8
    dk = torch.zeros(c, t, g, e, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    dq = torch.empty(n, u, h, e, dtype=torch.float32, device=q.device)
    dw = torch.empty(n, k, dtype=torch.float32, device=q.device)
    if paper:
        delta = (out.float() * dout.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
    else:
        lse = delta = dout  # unused by the mixture kernels
    for a, b in _unit_groups(n, u, h, e, k, chapter_major):
        sel_g = sel[a:b]
        index = InvertedIndex(sel_g, c, u, bm)
        rows = index.pairs.numel() * u
        dk_g = torch.zeros_like(dk) if (a, b) != (0, n) else dk
        dv_g = torch.zeros_like(dv) if (a, b) != (0, n) else dv
        part_dq = torch.empty(rows if chapter_major else 1, h, e, dtype=torch.float32, device=q.device)
        part_dw = torch.empty(rows if chapter_major else 1, h, dtype=torch.float32, device=q.device)
        if c:
            kern._bwd_chapter_major[(c, g)](q[a:b], keys, values, w[a:b], dout[a:b], lse[a:b], delta[a:b], dk_g,
                                            dv_g, part_dq, part_dw, index.offset, index.count, index.pairs, scale,
                                            u, h, g, k, t, e, PAPER=paper, WRITE_DQ=chapter_major,
                                            BM=bm, BT=bt, BE=be, **opts, **bwd_launch)
        if dk_g is not dk:
            dk += dk_g
            dv += dv_g
        if chapter_major:
            full = part_dq.new_zeros(((b - a) * k, u, h, e))
            full[index.pairs] = part_dq.view(-1, u, h, e)
            dq[a:b] = full.view(b - a, k, u, h, e).sum(1)
            full_w = part_dw.new_zeros(((b - a) * k, u, h))
            full_w[index.pairs] = part_dw.view(-1, u, h)
            dw[a:b] = full_w.view(b - a, k, u * h).sum(-1)
        else:
            num_mb = triton.cdiv(u, bm)
            dw_part = torch.empty(b - a, h, num_mb, k, dtype=torch.float32, device=q.device)
            kern._bwd_dq_unit_major[(num_mb, (b - a) * h)](q[a:b], keys, values, sel_g, w[a:b], dout[a:b],
                                                            lse[a:b], delta[a:b], dq[a:b], dw_part, scale,
                                                            u, h, g, k, t, e, num_mb, PAPER=paper,
                                                            BM=bm, BT=bt, BE=be, **opts)
            dw[a:b] = dw_part.sum(dim=(1, 2))
    return dq, dk, dv, dw * (sel >= 0)


class TritonChapterAttention(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; saves inputs, output and log-sum-exp (no probabilities)."""

    @staticmethod
    def forward(ctx, query, keys, values, selected, weights, gating, scale, chapter_major):
        q = query.contiguous()
        # tl.dot needs one operand dtype (e.g. bf16 queries under autocast with fp32 keys).
        keys_c, values_c = keys.to(query.dtype).contiguous(), values.to(query.dtype).contiguous()
        sel = selected.contiguous()
        w = (weights.float() * (sel >= 0)).contiguous()
        if keys_c.shape[0] == 0:  # nothing here: every slot is empty
            sel = torch.full_like(sel, -1)
        out, lse = triton_forward(q, keys_c, values_c, sel, w, gating, scale, chapter_major)
        ctx.save_for_backward(q, keys_c, values_c, sel, w, out, lse)
        ctx.gating, ctx.scale, ctx.chapter_major = gating, scale, chapter_major
        ctx.dtypes = (query.dtype, keys.dtype, values.dtype, weights.dtype)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, keys, values, sel, w, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv, dw = triton_backward(q, keys, values, sel, w, out, lse, dout, dlse, ctx.gating, ctx.scale,
                                         ctx.chapter_major)
        qd, kd, vd, wd = ctx.dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, dw.to(wd), None, None, None


def triton_chapter_attention(query, keys, values, selected, weights, gating: str, softmax_scale: float,
                             schedule: str | None = None):
    """Fused :func:`chapter_attention` on the Triton kernels: ``(out, lse)`` (paper) or ``(out, None)`` (mixture).

    ``schedule`` forces ``"unit"`` or ``"chapter"`` (tests); by default units of fewer than
    ``UNIT_MAJOR_MIN_QUERIES`` queries run chapter-major.
    """
    if query.shape[1] == 0 or query.shape[0] == 0:
        from moc_megatron.kernels.blocked import blocked_chapter_attention

        return blocked_chapter_attention(query, keys, values, selected, weights, gating, softmax_scale)
    if schedule is None:
        schedule = "unit" if query.shape[1] >= UNIT_MAJOR_MIN_QUERIES else "chapter"
    if schedule not in ("unit", "chapter"):
        raise ValueError(f"schedule must be 'unit' or 'chapter', not {schedule!r}")
    return TritonChapterAttention.apply(query, keys, values, selected, weights, gating, softmax_scale,
                                        schedule == "chapter")
