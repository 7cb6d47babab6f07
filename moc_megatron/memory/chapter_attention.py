"""Attention of routing units' queries over their selected chapters, returning log-sum-exp.

Pure tensor math: no process groups. Shapes use ``n`` routing units of ``u`` query positions,
``h`` query heads, ``g`` key/value heads, ``k`` selected chapters of ``T`` tokens, head width ``e``.
"""

from __future__ import annotations

import torch

from moc_megatron.kernels.choice import resolve_impl


def chapter_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: torch.Tensor,
    weights: torch.Tensor,
    gating: str,
    softmax_scale: float,
    need_lse: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attend every unit's queries to its selected chapters.

    Args:
        query: ``[n, u, h, e]``.
        keys, values: ``[c, T, g, e]`` for the ``c`` chapters available here, computed once per
            micro-batch from the (unweighted) memory tokens.
        selected: ``[n, k]`` indices into ``keys``; ``-1`` marks a slot that is not here.
        weights: ``[n, k]`` chapter weights.
        gating: ``paper``: keys and values of each chapter are scaled by its weight and one softmax
            spans all selected tokens; ``mixture``: one softmax per chapter, outputs summed with the
            weights.
        need_lse: ``False`` when this is the whole read (no partials to merge) and every ``selected``
            index is valid: paper gating then returns ``(out, None)`` (``gather`` runs one fused
            ``scaled_dot_product_attention``, with its own softmax and backward).
        impl: ``gather`` (the reference: copies every unit's k*T keys/values, then dense attention),
            ``blocked`` (:mod:`moc_megatron.kernels.blocked`: blocked online softmax, bounded memory),
            ``triton`` (:mod:`moc_megatron.kernels.triton_chapter_attention`: the fused kernel) or
            ``auto`` (see :func:`resolve_impl`). All give the same numbers to rounding.

    Returns:
        ``(out [n, u, h, e], lse [n, u, h])`` for ``paper`` (``out`` normalised over the tokens
        here, ``lse`` their log-sum-exp, ``-inf`` where nothing is selected), or ``(out, None)`` for
        ``mixture`` (partial outputs add up).
    """
    if gating not in ("paper", "mixture"):
        raise ValueError(f"unknown gating {gating!r}")
    impl = resolve_impl(impl, query)
    if impl != "gather":
        if impl == "blocked":
            from moc_megatron.kernels.blocked import blocked_chapter_attention as fused
        else:
            from moc_megatron.kernels.triton_chapter_attention import triton_chapter_attention as fused
        out, lse = fused(query, keys, values, selected, weights, gating, softmax_scale)
        return out, (lse if need_lse else None)
    return _gather_attention(query, keys, values, selected, weights, gating, softmax_scale, need_lse)


def _gather_attention(query, keys, values, selected, weights, gating, softmax_scale, need_lse):
    """The reference: every unit's selected keys/values copied out with ``index_select``, then dense math."""
    n, u, h, e = query.shape
    k = selected.shape[1]
    t, g = keys.shape[1], keys.shape[2]
    valid = selected >= 0
    index = selected.clamp(min=0)
    w = (weights * valid).to(query.dtype)
    # index_select's backward is index_add (fast); advanced indexing's is an accumulating index_put (slow on CPU).
    k_sel = keys.index_select(0, index.flatten()).view(n, k, t, g, e)
    v_sel = values.index_select(0, index.flatten()).view(n, k, t, g, e)
    q = query.view(n, u, g, h // g, e)
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    if gating == "paper":
        k_sel = (k_sel * w.view(n, k, 1, 1, 1)).reshape(n, k * t, g, e)
        v_sel = (v_sel * w.view(n, k, 1, 1, 1)).reshape(n, k * t, g, e)
        if not need_lse:
            # Same softmax(q k_sel^T * scale) v_sel, fused: query head j reads key/value head j // (h // g),
            # as in the view of q below.
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), k_sel.transpose(1, 2), v_sel.transpose(1, 2),
                scale=softmax_scale, enable_gqa=g != h,
            )
            return out.transpose(1, 2), None
        scores = torch.einsum("nugre,nmge->ngrum", q, k_sel).to(softmax_dtype) * softmax_scale
        mask = valid.repeat_interleave(t, dim=1).view(n, 1, 1, 1, k * t)
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [n, g, r, u]
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - safe_lse.unsqueeze(-1)).to(query.dtype)
        out = torch.einsum("ngrum,nmge->nugre", probs, v_sel).reshape(n, u, h, e)
        return out, lse.permute(0, 3, 1, 2).reshape(n, u, h)
    if gating == "mixture":
        scores = torch.einsum("nugre,nktge->ngrukt", q, k_sel).to(softmax_dtype) * softmax_scale
        probs = torch.softmax(scores, dim=-1).to(query.dtype) * w.view(n, 1, 1, 1, k, 1)
        out = torch.einsum("ngrukt,nktge->nugre", probs, v_sel).reshape(n, u, h, e)
        return out, None
    raise ValueError(f"unknown gating {gating!r}")


def merge_partials(
    outs: torch.Tensor, lses: torch.Tensor | None, unit_index: torch.Tensor, num_units: int
) -> torch.Tensor:
    """Combine partial attention outputs of the same units exactly.

    ``outs`` ``[p, u, h, e]`` and ``lses`` ``[p, u, h]`` are partials; ``unit_index`` ``[p]`` says which
    unit each belongs to. With log-sum-exps (paper gating) this is
    ``o = sum_r exp(lse_r - LSE) o_r`` with ``LSE = log sum_r exp(lse_r)``, the same single softmax
    as computing all chapters at once; without them (mixture gating) partials add up.
    """
    shape = (num_units, *outs.shape[1:])
    if lses is None:
        return outs.new_zeros(shape).index_add(0, unit_index, outs)
    lses = lses.to(torch.promote_types(lses.dtype, torch.float32))
    # The per-unit maximum only keeps exp() in range; any constant gives the same result.
    peak = torch.full((num_units, *lses.shape[1:]), float("-inf"), dtype=lses.dtype, device=lses.device)
    peak = peak.scatter_reduce(0, unit_index.view(-1, 1, 1).expand_as(lses), lses.detach(), "amax")
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    scaled = torch.exp(lses - peak[unit_index])
    total = scaled.new_zeros(peak.shape).index_add(0, unit_index, scaled)
    share = scaled / total[unit_index].clamp(min=torch.finfo(scaled.dtype).tiny)
    return outs.new_zeros(shape).index_add(0, unit_index, outs * share.unsqueeze(-1).to(outs.dtype))
