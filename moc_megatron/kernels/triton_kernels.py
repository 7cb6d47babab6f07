"""Triton kernels of the chapter attention (launched by :mod:`moc_megatron.kernels.triton_chapter_attention`).

A chapter is one key tile (``BT`` = ``T`` rounded up to a power of two, ``T <= 128``), read through a
unit's index list like a block of paged attention. Two schedules:

- *unit-major* (many queries per unit: sequence and chunk routing): a program owns ``BM`` queries of one
  unit and one head and loops over the unit's chapters with an online softmax (paper gating) or one
  softmax per chapter (mixture);
- *chapter-major* (few queries per unit: token routing): through an inverted index, a program owns ``BM``
  query rows of *different* units that read the same chapter, so every ``tl.dot`` has ``BM`` rows.

Scores and softmax statistics are fp32 whatever the input dtype. ``UPCAST`` loads every operand as fp32
(fp32 inputs, and the interpreter, whose bf16 arithmetic is wrong). All loads are masked.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_SPECIALIZE = ("KSEL",)
"""Integer arguments Triton should not specialise on (``== 1``, divisible by 16): the slot count only bounds a
loop and indexes pairs, so each value would compile the same kernel again (the shared chapters' ``k = 1``,
the routed ``k = 64``, both together ``k = 65``)."""


@triton.jit
def _load_chapter(ptr, c, gg, offs_t, offs_e, T, G, E, t_lim, UPCAST: tl.constexpr):
    """The ``[BT, BE]`` tile of chapter ``c`` (an int64 scalar), key/value head ``gg``; rows ``>= t_lim`` zero.

    ``t_lim`` is ``T``, or 0 for an empty slot (a scalar mask does not combine with block masks everywhere).
    """
    offs = ((c * T + offs_t[:, None]) * G + gg) * E + offs_e[None, :]
    mask = (offs_t[:, None] < t_lim) & (offs_e[None, :] < E)
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_unit_major(Q, K, V, SEL, W, OUT, LSE, scale, U, H, G, KSEL, T, E,
                    PAPER: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Grid ``(cdiv(U, BM), n * H)``: output ``[n, U, H, E]`` and (paper) log-sum-exp ``[n, U, H]``."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    hh = pid_nh % H
    gg = hh // (H // G)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_t = tl.arange(0, BT)
    offs_e = tl.arange(0, BE)
    m_mask = offs_m < U
    row = (n * U + offs_m).to(tl.int64) * H + hh
    q_mask = m_mask[:, None] & (offs_e[None, :] < E)
    q = tl.load(Q + row[:, None] * E + offs_e[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    t_mask = offs_t < T
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BE], tl.float32)
    for j in range(KSEL):
        c = tl.load(SEL + n * KSEL + j).to(tl.int64)
        valid = c >= 0
        c = tl.maximum(c, 0)
        w = tl.where(valid, tl.load(W + n * KSEL + j).to(tl.float32), 0.0)
        t_lim = tl.where(valid, T, 0)
        t_ok = offs_t < t_lim
        k = _load_chapter(K, c, gg, offs_t, offs_e, T, G, E, t_lim, UPCAST)
        v = _load_chapter(V, c, gg, offs_t, offs_e, T, G, E, t_lim, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        if PAPER:
            s = tl.where(t_ok[None, :], s * w, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = tl.dot((p * w).to(v.dtype), v, input_precision=PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        else:
            s = tl.where(t_mask[None, :], s, float("-inf"))
            mx = tl.max(s, 1)
            p = tl.exp(s - mx[:, None])
            l_c = tl.sum(p, 1)
            pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
            acc += pv * (w / l_c)[:, None]
    if PAPER:
        has = l_i > 0
        acc = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE + row, lse, mask=m_mask)
    tl.store(OUT + row[:, None] * E + offs_e[None, :], acc.to(OUT.dtype.element_ty), mask=q_mask)


@triton.jit
def _rows_of_tile(TILE_CHAP, TILE_START, PAIR_OFF, PAIR_CNT, PAIRS, tile, U, KSEL, BM: tl.constexpr):
    """The chapter of a chapter-major tile and its rows: pair positions, units, slots, query positions."""
    c = tl.load(TILE_CHAP + tile).to(tl.int64)
    start = tl.load(TILE_START + tile)
    pstart = tl.load(PAIR_OFF + c)
    count = tl.load(PAIR_CNT + c)
    rows = start + tl.arange(0, BM)
    r_mask = rows < count * U
    pidx = pstart + rows // U
    pos = rows % U
    pair = tl.load(PAIRS + pidx, mask=r_mask, other=0).to(tl.int64)
    return c, r_mask, pidx * U + pos, pair // KSEL, pair, pos


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_chapter_major(Q, K, V, W, PART_O, PART_LSE, TILE_CHAP, TILE_START, PAIR_OFF, PAIR_CNT, PAIRS,
                       scale, U, H, G, KSEL, T, E,
                       PAPER: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Grid ``(tiles, H)``: each row's partial over one chapter, ``[R, H, E]`` fp32, and its log-sum-exp.

    Paper gating: the partial is normalised over the chapter's weighted scores (merged by log-sum-exp
    afterwards); mixture: it is already weighted (partials add up).
    """
    tile = tl.program_id(0)
    hh = tl.program_id(1)
    gg = hh // (H // G)
    c, r_mask, prow, unit, pair, pos = _rows_of_tile(TILE_CHAP, TILE_START, PAIR_OFF, PAIR_CNT, PAIRS, tile,
                                                     U, KSEL, BM)
    offs_t = tl.arange(0, BT)
    offs_e = tl.arange(0, BE)
    e_mask = offs_e < E
    t_mask = offs_t < T
    qrow = (unit * U + pos) * H + hh
    q = tl.load(Q + qrow[:, None] * E + offs_e[None, :], mask=r_mask[:, None] & e_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    w = tl.load(W + pair, mask=r_mask, other=0.0).to(tl.float32)
    k = _load_chapter(K, c, gg, offs_t, offs_e, T, G, E, T, UPCAST)
    v = _load_chapter(V, c, gg, offs_t, offs_e, T, G, E, T, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if PAPER:
        s = s * w[:, None]
    s = tl.where(t_mask[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    p = tl.exp(s - mx[:, None])
    l_c = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v, input_precision=PREC) * (w / l_c)[:, None]
    out_row = prow * H + hh
    tl.store(PART_O + out_row[:, None] * E + offs_e[None, :], o, mask=r_mask[:, None] & e_mask[None, :])
    if PAPER:
        tl.store(PART_LSE + out_row, mx + tl.log(l_c), mask=r_mask)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_chapter_major(Q, K, V, W, DO, LSE, DELTA, DK, DV, PART_DQ, PART_DW,
                       PAIR_OFF, PAIR_CNT, PAIRS, scale, U, H, G, KSEL, T, E,
                       PAPER: tl.constexpr, WRITE_DQ: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Grid ``(chapters, G)``: dK, dV of one chapter and key/value head, summed over every row that read it.

    The program walks the chapter's rows (inverted index) in a fixed order, for each of the ``H // G``
    query heads of the group: deterministic, no atomics. With ``WRITE_DQ`` (token routing) it also
    writes each row's dQ over this chapter and the row's share of the chapter weight's gradient
    (``PART_DQ [R, H, E]``, ``PART_DW [R, H]``); otherwise the unit-major dQ kernel computes them.
    Paper gating reads the final per-row log-sum-exp and ``delta = rowsum(o * do) - dlse``.
    """
    c = tl.program_id(0).to(tl.int64)
    gg = tl.program_id(1)
    R = H // G
    pstart = tl.load(PAIR_OFF + c)
    count = tl.load(PAIR_CNT + c)
    offs_t = tl.arange(0, BT)
    offs_e = tl.arange(0, BE)
    e_mask = offs_e < E
    t_mask = offs_t < T
    k = _load_chapter(K, c, gg, offs_t, offs_e, T, G, E, T, UPCAST)
    v = _load_chapter(V, c, gg, offs_t, offs_e, T, G, E, T, UPCAST)
    dk = tl.zeros([BT, BE], tl.float32)
    dv = tl.zeros([BT, BE], tl.float32)
    for hr in range(R):
        hh = gg * R + hr
        for start in range(0, count * U, BM):
            rows = start + tl.arange(0, BM)
            r_mask = rows < count * U
            pidx = pstart + rows // U
            pos = rows % U
            pair = tl.load(PAIRS + pidx, mask=r_mask, other=0).to(tl.int64)
            unit = pair // KSEL
            qrow = (unit * U + pos) * H + hh
            x_mask = r_mask[:, None] & e_mask[None, :]
            q = tl.load(Q + qrow[:, None] * E + offs_e[None, :], mask=x_mask, other=0.0)
            do = tl.load(DO + qrow[:, None] * E + offs_e[None, :], mask=x_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            w = tl.load(W + pair, mask=r_mask, other=0.0).to(tl.float32)
            raw = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            dp_raw = tl.dot(do, tl.trans(v), input_precision=PREC)
            if PAPER:
                # Masks as 1-D biases (lse = +inf on padding rows, -inf on padding keys), not a 2-D select.
                lse = tl.load(LSE + qrow, mask=r_mask, other=float("inf"))
                delta = tl.load(DELTA + qrow, mask=r_mask, other=0.0)
                key_bias = tl.where(t_mask, 0.0, float("-inf"))
                p = tl.exp(raw * w[:, None] - lse[:, None] + key_bias[None, :])
                ds = p * (dp_raw * w[:, None] - delta[:, None])
                dw_row = tl.sum(ds * raw + p * dp_raw, 1)
                dsw = ds * (w * scale)[:, None]
                pw = p * w[:, None]
            else:
                s = tl.where(t_mask[None, :], raw, float("-inf"))
                mx = tl.max(s, 1)
                p = tl.exp(s - mx[:, None])
                p = tl.where(r_mask[:, None] & t_mask[None, :], p / tl.sum(p, 1)[:, None], 0.0)
                dw_row = tl.sum(p * dp_raw, 1)  # do . o_c
                dsw = p * (dp_raw - dw_row[:, None]) * (w * scale)[:, None]
                pw = p * w[:, None]
            # Cast once (not once per dot) so only the narrow copies of pw and dsw stay live, and finish dq
            # before the dK/dV dots so its tile is dead by then: with the launcher's num_stages=2 for WRITE_DQ
            # this keeps the token-routing backward within 255 registers without spilling on sm_90 (bf16/fp16;
            # scripts/compile_kernels_sm90.py).
            pw = pw.to(do.dtype)
            dsw = dsw.to(q.dtype)
            if WRITE_DQ:
                out_row = (pidx * U + pos) * H + hh
                tl.store(PART_DW + out_row, dw_row, mask=r_mask)
                dq = tl.dot(dsw, k, input_precision=PREC)
                tl.store(PART_DQ + out_row[:, None] * E + offs_e[None, :], dq, mask=x_mask)
            dv += tl.dot(tl.trans(pw), do, input_precision=PREC)
            dk += tl.dot(tl.trans(dsw), q, input_precision=PREC)
    offs = ((c * T + offs_t[:, None]) * G + gg) * E + offs_e[None, :]
    mask = t_mask[:, None] & e_mask[None, :]
    tl.store(DK + offs, dk, mask=mask)
    tl.store(DV + offs, dv, mask=mask)


@triton.jit(do_not_specialize=NO_SPECIALIZE + ("NUM_MB",))
def _bwd_dq_unit_major(Q, K, V, SEL, W, DO, LSE, DELTA, DQ, DW_PART, scale, U, H, G, KSEL, T, E, NUM_MB,
                       PAPER: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                       BM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """Grid ``(cdiv(U, BM), n * H)``: dQ ``[n, U, H, E]`` (fp32) and per-program chapter-weight gradients.

    ``DW_PART [n, H, NUM_MB, KSEL]`` holds this program's share of ``d weight[n, j]``, summed on the host
    in a fixed order.
    """
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    hh = pid_nh % H
    gg = hh // (H // G)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_t = tl.arange(0, BT)
    offs_e = tl.arange(0, BE)
    m_mask = offs_m < U
    t_mask = offs_t < T
    row = (n * U + offs_m).to(tl.int64) * H + hh
    x_mask = m_mask[:, None] & (offs_e[None, :] < E)
    q = tl.load(Q + row[:, None] * E + offs_e[None, :], mask=x_mask, other=0.0)
    do = tl.load(DO + row[:, None] * E + offs_e[None, :], mask=x_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if PAPER:
        lse = tl.load(LSE + row, mask=m_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a unit with nothing selected: p = 0
        delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    dq = tl.zeros([BM, BE], tl.float32)
    for j in range(KSEL):
        c = tl.load(SEL + n * KSEL + j).to(tl.int64)
        valid = c >= 0
        c = tl.maximum(c, 0)
        w = tl.where(valid, tl.load(W + n * KSEL + j).to(tl.float32), 0.0)
        t_lim = tl.where(valid, T, 0)
        t_ok = offs_t < t_lim
        k = _load_chapter(K, c, gg, offs_t, offs_e, T, G, E, t_lim, UPCAST)
        v = _load_chapter(V, c, gg, offs_t, offs_e, T, G, E, t_lim, UPCAST)
        raw = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        dp_raw = tl.dot(do, tl.trans(v), input_precision=PREC)
        keep = m_mask[:, None] & t_ok[None, :]
        if PAPER:
            p = tl.where(keep, tl.exp(raw * w - lse[:, None]), 0.0)
            ds = p * (dp_raw * w - delta[:, None])
            dw = tl.sum(tl.sum(ds * raw + p * dp_raw, 1), 0)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * (w * scale)
        else:
            s = tl.where(t_mask[None, :], raw, float("-inf"))
            mx = tl.max(s, 1)
            p = tl.exp(s - mx[:, None])
            p = tl.where(keep, p / tl.sum(p, 1)[:, None], 0.0)
            delta_c = tl.sum(p * dp_raw, 1)
            dw = tl.sum(delta_c, 0)
            ds = p * (dp_raw - delta_c[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * (w * scale)
        tl.store(DW_PART + (pid_nh * NUM_MB + pid_m) * KSEL + j, tl.where(valid, dw, 0.0))
    tl.store(DQ + row[:, None] * E + offs_e[None, :], dq, mask=x_mask)
