"""The memory read with the K/V projection inside the blocks: project, read and merge a block of chapters at a time.

``blocked`` chapter attention bounds the read; the layer would still project the keys and values of every
chapter with traffic at once (``[chapters, T, width]`` per tensor, with the normalised tokens and all their
gradients: about 200 MB each at 1,025 chapters of 64 x 768). Here the chapters with traffic are visited in
blocks of at most :data:`PROJECTION_BLOCK_ELEMENTS` memory-token elements: each block's bank rows go through
the layer's own norm and ``linear_k``/``linear_v`` modules (whatever the spec built: megatron's or TE's
linears), the units that selected a chapter of the block read it (units with many queries: the blocked
online softmax of :mod:`moc_megatron.kernels.blocked`; units of fewer than 128 queries: the chapter-major tiles of
:mod:`moc_megatron.kernels.chapter_major`), and the partials are merged exactly by their log-sum-exps (paper
gating: the same single softmax over all selected tokens) or summed (mixture).

Backward recomputes every block's projection (as a reentrant activation checkpoint does) and its share of
the read's gradients from the units' final output and log-sum-exp, so only ``O(tokens x width)`` plus one
block is alive at a time. The gradients of the modules' parameters are summed over blocks with
``torch.autograd.grad`` and returned once, so each parameter's gradient accumulator (megatron DDP's hook)
fires once per backward; the bank's rows are added into ``main_grad`` (or ``.grad``) directly, as
:func:`moc_megatron.memory.bank.gather_rows` does. Chapter-major tiles are
:mod:`moc_megatron.kernels.chapter_major`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moc_megatron.kernels.blocked import blocked_backward, blocked_forward
from moc_megatron.kernels.chapter_major import Accumulator, chapter_major_backward, chapter_major_forward

PROJECTION_BLOCK_ELEMENTS = 1 << 19
"""Memory-token elements (chapters x T x bank width) projected at once: 512 Ki (2 MiB in fp32, 10 chapters
of 64 x 768). Reads whose chapters with traffic all fit take the one-projection path instead."""

READ_BLOCK_ELEMENTS = 1 << 20
"""Element budget of one block of the read inside a projection block (1 Mi: 4 MiB in fp32)."""

CHAPTER_MAJOR_QUERIES = 128
"""Units with fewer queries than this (token and chunk routing) read a projection block chapter-major (each
chapter's K/V once per tile of units); longer units (sequence routing) read it unit by unit with the online
softmax. Measured on the CPU with 64-token chunks (``bench/bench_memory_read.py --cases issue``: width 768,
1,025 chapters x 64 tokens, top-64, 2 x 1024 tokens): chapter-major 10.6 s, unit-major 14 s per layer
forward+backward."""


@dataclass
class ChapterSource:
    """Consecutive chapters of the read: rows ``bank[ids]`` normalised by ``norm`` (shared or routed chapters)."""

    bank: torch.Tensor
    """``[C, T, d]`` memory tokens (a bank parameter)."""
    ids: torch.Tensor
    """``[c]`` rows of ``bank``, in the order ``selected`` indexes them."""
    norm: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Plan:
    """Everything the autograd function needs besides its tensor inputs."""

    sources: list[ChapterSource]
    project: Callable
    gating: str
    scale: float
    read_budget: int
    projection_budget: int
    banks: list[torch.Tensor]
    params: list[torch.Tensor]


def _blocks(sources: Sequence[ChapterSource], budget: int):
    """``(source, ids, first, last)``: blocks of chapters of one source, ``first:last`` in ``selected``'s numbering."""
    offset = 0
    for src in sources:
        t, d = src.bank.shape[1:]
        size = max(1, budget // (t * d))
        for j0 in range(0, src.ids.numel(), size):
            j1 = min(src.ids.numel(), j0 + size)
            yield src, src.ids[j0:j1], offset + j0, offset + j1
        offset += src.ids.numel()


def _compact(selected: torch.Tensor, weights: torch.Tensor, first: int, last: int):
    """Units reading a chapter in ``first:last`` and their slots there, valid ones first: ``(units, slots, sel, w)``."""
    mask = (selected >= first) & (selected < last)
    units = mask.any(1).nonzero().flatten()
    m = mask[units]
    kb = int(m.sum(1).max()) if units.numel() else 0
    slots = torch.argsort((~m).to(torch.int32), dim=1, stable=True)[:, :kb]
    sel = torch.where(m.gather(1, slots), selected[units].gather(1, slots) - first, -1)
    return units, slots, sel, weights[units].gather(1, slots)


def _fp8_state():
    """Transformer Engine's FP8 autocast state (recipe, group) when it is on, else ``None``."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except Exception:  # no Transformer Engine (the CPU) or an incompatible one
        return None
    if not FP8GlobalStateManager.is_fp8_enabled():
        return None
    return FP8GlobalStateManager.get_fp8_recipe(), FP8GlobalStateManager.get_fp8_group()


def _recompute_context(ctx) -> contextlib.ExitStack:
    """Grad mode plus the forward's autocast and FP8 state, for recomputing a block in backward."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    device_type, enabled, dtype = ctx.autocast
    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
    if ctx.fp8 is not None:
        import transformer_engine.pytorch as te

        stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=ctx.fp8[0], fp8_group=ctx.fp8[1]))
        try:
            from transformer_engine.pytorch.distributed import activation_recompute_forward

            stack.enter_context(activation_recompute_forward(activation_recompute=True, recompute_phase=True))
        except Exception:  # older TE: amax bookkeeping of the recompute is TE's default
            pass
    return stack


def _add_rows(bank: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` into rows ``ids`` of ``bank``'s ``main_grad`` (megatron DDP) or ``.grad``."""
    main_grad = getattr(bank, "main_grad", None)
    if main_grad is not None:
        main_grad.index_add_(0, ids, grad.to(main_grad.dtype))
        bank.grad_added_to_main_grad = True
        return
    if bank.grad is None:
        bank.grad = torch.zeros_like(bank)
    bank.grad.index_add_(0, ids, grad.to(bank.grad.dtype))


class _ProjectedRead(torch.autograd.Function):
    """``(out, lse)`` of the read; inputs ``query, weights, selected, plan, *banks, *params``."""

    @staticmethod
    def forward(ctx, query, weights, selected, plan, *tensors):  # noqa: D102
        sources, project, gating, scale = plan.sources, plan.project, plan.gating, plan.scale
        read_budget, proj_budget = plan.read_budget, plan.projection_budget
        n, u, h, e = query.shape
        acc = torch.promote_types(query.dtype, torch.float32)
        q = query.to(acc)
        into = Accumulator(n, u, h, e, gating == "paper", acc, query.device)
        for src, ids, first, last in _blocks(sources, proj_budget):
            keys, values = project(src.norm(src.bank.index_select(0, ids)))
            _read_block(q, keys, values, selected, weights, first, last, gating, scale, read_budget, into)
        out, lse = into.result()
        ctx.plan = plan
        ctx.autocast = (query.device.type, torch.is_autocast_enabled(query.device.type),
                        torch.get_autocast_dtype(query.device.type))
        ctx.fp8 = _fp8_state()
        ctx.query_dtype, ctx.weights_dtype = query.dtype, weights.dtype
        ctx.save_for_backward(q, weights, selected, out, lse if lse is not None else out.new_empty(0))
        return out.to(query.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: D102
        plan = ctx.plan
        sources, project, gating, scale = plan.sources, plan.project, plan.gating, plan.scale
        read_budget, proj_budget, banks, params = plan.read_budget, plan.projection_budget, plan.banks, plan.params
        q, weights, selected, out, lse = ctx.saved_tensors
        lse = lse if gating == "paper" else None
        acc = q.dtype
        dq = torch.zeros_like(q)
        dw = torch.zeros(weights.shape, dtype=acc, device=q.device)
        dout = torch.zeros_like(out) if dout is None else dout.to(acc)
        delta = None
        if gating == "paper":
            delta = (out * dout).sum(-1)
            if dlse is not None:
                delta = delta - dlse.to(acc)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        bank_touched = {}
        for src, ids, first, last in _blocks(sources, proj_budget):
            rows_grad = src.bank.requires_grad
            with _recompute_context(ctx):
                rows = src.bank.detach().index_select(0, ids).requires_grad_(rows_grad)
                keys, values = project(src.norm(rows))
            dk = torch.zeros(keys.shape, dtype=acc, device=q.device)
            dv = torch.zeros_like(dk)
            _read_block_backward(q, keys.detach(), values.detach(), selected, weights, out, lse, dout, delta,
                                 dlse, first, last, gating, scale, read_budget, dq, dk, dv, dw)
            inputs = ([rows] if rows_grad else []) + [p for p in params if p.requires_grad]
            if not inputs or not keys.requires_grad:
                continue
            grads = torch.autograd.grad((keys, values), inputs, (dk.to(keys.dtype), dv.to(values.dtype)),
                                        allow_unused=True)
            if rows_grad:
                if grads[0] is not None:
                    _add_rows(src.bank, ids, grads[0])
                    bank_touched[id(src.bank)] = src.bank
                grads = grads[1:]
            it = iter(grads)
            for i, p in enumerate(params):
                if not p.requires_grad:
                    continue
                grad = next(it)
                if grad is not None:
                    param_grads[i] = grad if param_grads[i] is None else param_grads[i] + grad
        bank_grads = []
        for bank in banks:
            # As gather_rows: under megatron DDP an (unread) placeholder keeps the grad-ready hook firing.
            touched = id(bank) in bank_touched and getattr(bank, "main_grad", None) is not None
            bank_grads.append(torch.empty_like(bank) if touched else None)
        return (dq.to(ctx.query_dtype), dw.to(ctx.weights_dtype), None, None, *bank_grads, *param_grads)


def _read_block(q, keys, values, selected, weights, first, last, gating, scale, budget, into: Accumulator) -> None:
    """Add the partial read of chapters ``first:last`` (``keys``/``values``) into ``into``."""
    if q.shape[1] < CHAPTER_MAJOR_QUERIES:
        sel = torch.where((selected >= first) & (selected < last), selected - first, -1)
        chapter_major_forward(q, keys, values, sel, weights, gating, scale, budget, into)
        return
    units, _, sel, w = _compact(selected, weights, first, last)
    if units.numel():
        out, lse = blocked_forward(q.index_select(0, units), keys, values, sel, w, gating, scale, budget)
        into.add(units, out, lse)


def _read_block_backward(q, keys, values, selected, weights, out, lse, dout, delta, dlse, first, last, gating,
                         scale, budget, dq, dk, dv, dw) -> None:
    """Add chapters ``first:last``'s share of the read's gradients into ``dq``, ``dk``, ``dv``, ``dw``."""
    if q.shape[1] < CHAPTER_MAJOR_QUERIES:
        sel = torch.where((selected >= first) & (selected < last), selected - first, -1)
        chapter_major_backward(q, keys, values, sel, weights, out, lse, dout, delta, gating, scale, budget,
                               dq, dk, dv, dw)
        return
    units, slots, sel, w = _compact(selected, weights, first, last)
    if not units.numel():
        return
    pick = lambda x: None if x is None or x.numel() == 0 else x.index_select(0, units)  # noqa: E731
    dq_b, dk_b, dv_b, dw_b = blocked_backward(pick(q), keys, values, sel, w.to(q.dtype), pick(out), pick(lse),
                                              pick(dout), pick(dlse), gating, scale, budget)
    dq.index_add_(0, units, dq_b)
    dk.add_(dk_b)
    dv.add_(dv_b)
    dw.index_put_((units.unsqueeze(1).expand_as(slots), slots), dw_b.to(dw.dtype), accumulate=True)


def projected_chapter_attention(query: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor,
                                sources: Sequence[ChapterSource],
                                project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                                params: Sequence[torch.Tensor], gating: str, softmax_scale: float,
                                need_lse: bool = True, read_budget: int | None = None,
                                projection_budget: int | None = None):
    """:func:`chapter_attention` of ``query`` over chapters given as bank rows, projected block by block.

    Args:
        query, weights, selected, gating, softmax_scale, need_lse: as for ``chapter_attention``;
            ``selected`` indexes the chapters of ``sources`` one after the other (``-1``: not here).
        sources: the chapters' rows and norms (e.g. the shared chapters, then the routed ones with traffic).
        project: normalised memory tokens ``[c, T, d]`` -> ``(keys, values)`` ``[c, T, g, e]``, through the
            layer's own linears.
        params: the parameters ``project`` and the norms use (their gradients are returned once).
        read_budget: element budget of one block of the read (default :data:`READ_BLOCK_ELEMENTS`).
        projection_budget: memory-token elements projected at once (default :data:`PROJECTION_BLOCK_ELEMENTS`).

    Returns:
        ``(out, lse)`` as ``chapter_attention`` (``lse`` ``None`` for mixture or when not ``need_lse``).
    """
    if gating not in ("paper", "mixture"):
        raise ValueError(f"unknown gating {gating!r}")
    banks = list({id(s.bank): s.bank for s in sources}.values())
    plan = _Plan(list(sources), project, gating, softmax_scale,
                 READ_BLOCK_ELEMENTS if read_budget is None else read_budget,
                 PROJECTION_BLOCK_ELEMENTS if projection_budget is None else projection_budget, banks, list(params))
    out, lse = _ProjectedRead.apply(query, weights, selected, plan, *plan.banks, *plan.params)
    return out, (lse if need_lse else None)
