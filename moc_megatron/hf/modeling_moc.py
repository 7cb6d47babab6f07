"""Hugging Face causal LM of the Mixture-of-Chapters (MoC) architecture, for ``trust_remote_code``.

Self-contained: imports torch and transformers only, so an exported folder runs where neither this
project nor megatron-core is installed. The math is the Megatron model's (``moc_megatron.memory``):

    h = h + SelfAttn(RMSNorm(h))
    h = h + MemRead(RMSNorm(h), M)          # memory layers only
    h = h + MLP(RMSNorm(h))

Generation keeps, next to the self-attention KV cache, per memory layer: the keys/values of every
chapter read so far (projected once, never per generated token) and the routing state. ``chunk`` and
``token`` routing are causal, so decoding with the cache routes exactly as a full forward would.
``sequence`` routing (the paper's) pools the whole sequence; with a cache it routes once, on the
prompt, and keeps that choice for every generated token (a full forward would re-route on the prompt
plus the tokens generated so far).

Padding: a 2-D ``attention_mask`` marks real tokens; routing pools only real tokens and positions
count real tokens only, so a left- or right-padded batch gives each sequence the result it gets alone.
Without a mask, a trailing run of ``config.padding_id_without_mask`` (set at export to 0 when id 0 is the
tokenizer's unk or pad token, never a text token) is taken as right padding: lm-evaluation-harness pads
its batches on the right with id 0 and calls the model without a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_moc import MoCConfig

# transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (argument and output field).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoCRMSNorm(nn.Module):
    """RMSNorm with a learned scale (``torch.nn.functional.rms_norm``, as the Megatron model)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _inv_freq(head_dim: int, rope: dict, device: torch.device) -> torch.Tensor:
    """RoPE frequencies; ``rope_type`` ``llama3`` scales them as Llama 3.x (and megatron-core's ``rope_scaling``)."""
    theta = float(rope["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if rope.get("rope_type", "default") != "llama3":
        return inv_freq
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq  # torch.pi is math.pi (a float), as megatron-core uses
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def _rope(positions: torch.Tensor, head_dim: int, rope: dict, dtype: torch.dtype):
    """``cos, sin`` ``[b, 1, s, head_dim]`` of RoPE (non-interleaved halves, Megatron's and Llama's)."""
    inv_freq = _inv_freq(head_dim, rope, positions.device)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               impl: str) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``[b, heads, s, e]`` (k/v may have fewer heads: GQA)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)


def _impl(config: MoCConfig) -> str:
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"MoC supports attn_implementation 'sdpa' or 'eager', not {impl!r}")
    return impl


class MoCSelfAttention(nn.Module):
    """Causal GQA self-attention with RoPE (``q_proj``/``k_proj``/``v_proj``/``o_proj``; q/k/v biases with
    ``config.qkv_bias``; per-head RMSNorm of queries and keys before RoPE with ``config.qk_norm``)."""

    def __init__(self, config: MoCConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        bias = bool(getattr(config, "qkv_bias", False))
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        if getattr(config, "qk_norm", False):
            self.q_norm = MoCRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = MoCRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: Cache | None) -> torch.Tensor:
        """``x`` ``[b, s, hidden]`` -> ``[b, s, hidden]``."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = _attention(q, k, v, mask, self.head_dim ** -0.5, _impl(self.config))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MoCMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: MoCConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise feed-forward."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoCMemoryBank(nn.Module):
    """Memory tokens: ``shared`` ``[S, T, d]`` (always read) and ``routed`` ``[C - S, T, d]``."""

    def __init__(self, config: MoCConfig) -> None:
        super().__init__()
        shape = (config.chapter_size, config.bank_dim)
        self.shared = nn.Parameter(torch.empty(config.num_shared_chapters, *shape))
        self.routed = nn.Parameter(torch.empty(config.num_routed_chapters, *shape))


class _ChapterKV:
    """Keys/values of the chapters projected so far for one memory layer (ids sorted, shared first)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class MoCMemoryAttention(nn.Module):
    """The memory read: route, project the selected chapters once, attend, ``o_proj`` (zero at import)."""

    def __init__(self, config: MoCConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv = config.memory_num_heads, config.memory_num_kv_heads
        self.head_dim = config.memory_head_dim
        h, d = config.hidden_size, config.bank_dim
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.shared_norm = MoCRMSNorm(d, config.rms_norm_eps)
        self.routed_norm = MoCRMSNorm(d, config.rms_norm_eps)
        self.router = nn.Linear(h, config.num_routed_chapters, bias=True)
        self.bank = None if config.shared_bank else MoCMemoryBank(config)

    # --- routing -------------------------------------------------------------------------------
    def _route(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chapters ``[n, S + k]`` (global ids, shared first) and their weights for ``[n, hidden]`` features.

        Mirrors ``moc_megatron.memory.router.ChapterRouter.forward`` and ``chapter_weights`` (checked by
        ``tests/unit/test_hf_components.py``)."""
        cfg = self.config
        dtype = torch.promote_types(features.dtype, torch.float32)
        logits = F.linear(features.to(dtype), self.router.weight.to(dtype), self.router.bias.to(dtype))
        top_p, top_i = torch.topk(torch.softmax(logits, dim=-1), cfg.memory_top_k, dim=-1)
        routed = top_p / top_p.sum(dim=-1, keepdim=True) * cfg.routed_scaling_factor
        n, s_count = routed.shape[0], cfg.num_shared_chapters
        shared = torch.ones(n, s_count, dtype=routed.dtype, device=routed.device)
        total = shared.sum(-1, keepdim=True) + routed.sum(-1, keepdim=True)
        ids = torch.cat([torch.arange(s_count, device=top_i.device).expand(n, s_count), top_i + s_count], dim=1)
        return ids, torch.cat([shared, routed], dim=1) / total

    # --- chapter keys/values -------------------------------------------------------------------
    def _project(self, bank: MoCMemoryBank, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, n = self.config, ids.numel()
        shared = ids < cfg.num_shared_chapters
        tokens = bank.routed.new_empty(n, cfg.chapter_size, cfg.bank_dim)
        tokens[shared] = self.shared_norm(bank.shared[ids[shared]])
        tokens[~shared] = self.routed_norm(bank.routed[ids[~shared] - cfg.num_shared_chapters])
        shape = (n, cfg.chapter_size, self.num_kv, self.head_dim)
        return self.k_proj(tokens).view(shape), self.v_proj(tokens).view(shape)

    def _lookup(self, bank: MoCMemoryBank, store: _ChapterKV, ids: torch.Tensor) -> torch.Tensor:
        """Make sure every chapter in ``ids`` is projected in ``store``; return ``ids`` as indices into it."""
        needed = torch.unique(ids)
        if store.ids is not None:
            needed = needed[~torch.isin(needed, store.ids)]
        if needed.numel():
            keys, values = self._project(bank, needed)
            if store.ids is None:
                store.ids, store.keys, store.values = needed, keys, values
            else:
                order = torch.argsort(torch.cat([store.ids, needed]))
                store.ids = torch.cat([store.ids, needed])[order]
                store.keys = torch.cat([store.keys, keys])[order]
                store.values = torch.cat([store.values, values])[order]
        return torch.searchsorted(store.ids, ids)

    def _read(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
        """Units' queries ``[n, u, h, e]`` over their chapters ``index`` ``[n, kk]`` with ``weights``.

        Mirrors ``moc_megatron.memory.chapter_attention.chapter_attention(impl="gather", need_lse=False)``
        (checked by ``tests/unit/test_hf_components.py``)."""
        n, u, h, e = query.shape
        kk, t, g = index.shape[1], keys.shape[1], keys.shape[2]
        k_sel = keys.index_select(0, index.flatten()).view(n, kk, t, g, e)
        v_sel = values.index_select(0, index.flatten()).view(n, kk, t, g, e)
        w = weights.to(query.dtype)
        scale = self.head_dim ** -0.5
        if self.config.gating == "paper":  # weighted tokens, one softmax over all of them
            k_sel = (k_sel * w.view(n, kk, 1, 1, 1)).reshape(n, kk * t, g, e).transpose(1, 2)
            v_sel = (v_sel * w.view(n, kk, 1, 1, 1)).reshape(n, kk * t, g, e).transpose(1, 2)
            return _attention(query.transpose(1, 2), k_sel, v_sel, None, scale, _impl(self.config)).transpose(1, 2)
        q = query.view(n, u, g, h // g, e)  # mixture: one softmax per chapter
        scores = torch.einsum("nugre,nktge->ngrukt", q, k_sel).to(torch.promote_types(q.dtype, torch.float32))
        probs = torch.softmax(scores * scale, dim=-1).to(q.dtype) * w.view(n, 1, 1, 1, kk, 1)
        return torch.einsum("ngrukt,nktge->nugre", probs, v_sel).reshape(n, u, h, e)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, real: torch.Tensor, bank: MoCMemoryBank, state: dict | None,
                doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """Memory read of the normalised hidden states ``x`` ``[b, s, hidden]``.

        ``real`` ``[b, s]`` marks real (non-padding) tokens; ``doc_start`` ``[b, s]`` the real tokens that start a
        document (given with ``document`` routing or ``reset_attention_mask``). ``state`` (a dict kept in the
        generation cache, or ``None`` for a stand-alone forward) holds the projected chapters and routing state.
        """
        b, s, _ = x.shape
        bank = self.bank if self.bank is not None else bank
        state = {} if state is None else state
        store = state.setdefault("chapters", _ChapterKV())
        query = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        unit = self.config.routing_unit
        if unit == "document" or (unit == "chunk" and self.config.reset_attention_mask):
            out = self._document_read(x, query, real, doc_start, bank, state, store)
        elif unit == "sequence":
            if "ids" not in state:  # route once: on the whole input, or on the prompt when generating
                m = real.unsqueeze(-1).to(x.dtype)
                state["ids"], state["weights"] = self._route((x * m).sum(1) / m.sum(1).clamp(min=1))
            index = self._lookup(bank, store, state["ids"])
            out = self._read(query, store.keys, store.values, index, state["weights"])
        elif unit == "token":
            ids, weights = self._route(x.reshape(b * s, -1))
            index = self._lookup(bank, store, ids)
            out = self._read(query.reshape(b * s, 1, self.num_heads, self.head_dim), store.keys, store.values,
                             index, weights).view(b, s, self.num_heads, self.head_dim)
        else:
            out = self._chunk_read(x, query, real, bank, state, store)
        return self.o_proj(out.reshape(b, s, -1))

    def _chunk_read(self, x, query, real, bank, state, store) -> torch.Tensor:
        """Chunk routing: chunk ``j`` (positions ``[j*c, (j+1)*c)`` of real tokens) routes on the mean of
        the real tokens before it (mirrors ``moc_megatron.memory.units.RoutingUnits.pool``). ``state``
        carries the running sum, the length and the current chunk's choice across calls, so decoding token by
        token routes exactly as one full forward."""
        b, s, hid = x.shape
        cs = self.config.chunk_size
        acc = torch.promote_types(x.dtype, torch.float32)
        total = state.get("sum", x.new_zeros(b, hid, dtype=acc))
        length = state.get("length", torch.zeros(b, dtype=torch.long, device=x.device))
        m = real.long()
        pos = length[:, None] + torch.cumsum(m, 1) - m  # position of each real token among real tokens
        chunk = torch.div(pos, cs, rounding_mode="floor")
        xm = x.to(acc) * m.unsqueeze(-1)
        before = total[:, None] + torch.cumsum(xm, 1) - xm  # sum of the real tokens before each token
        starts = real & (pos % cs == 0)
        if not real.any():
            return torch.zeros_like(query)
        lo, hi = int(chunk[real].min()), int(chunk[real].max())
        width = hi - lo + 1
        kk = self.config.num_shared_chapters + self.config.memory_top_k
        ids = torch.zeros(b, width, kk, dtype=torch.long, device=x.device)
        weights = torch.zeros(b, width, kk, dtype=acc, device=x.device)
        if "ids" in state:  # the chunk that was under way when the last call ended
            cont = (length > 0) & (length % cs != 0)
            rows = cont.nonzero().flatten()
            col = torch.div(length[rows] - 1, cs, rounding_mode="floor") - lo
            ids[rows, col], weights[rows, col] = state["ids"][rows], state["weights"][rows]
        if starts.any():
            rows, cols = starts.nonzero(as_tuple=True)
            feats = before[rows, cols] / pos[rows, cols].clamp(min=1).unsqueeze(-1).to(acc)
            new_ids, new_w = self._route(feats.to(x.dtype) if acc == x.dtype else feats)
            ids[rows, chunk[rows, cols] - lo], weights[rows, chunk[rows, cols] - lo] = new_ids, new_w
        # Scatter the queries into a [b, width * cs] grid of chunk slots (padding goes to a spare slot).
        slot = torch.where(real, (chunk - lo) * cs + pos % cs, width * cs)
        grid = query.new_zeros(b, width * cs + 1, self.num_heads, self.head_dim)
        grid.scatter_(1, slot[..., None, None].expand_as(query), query)
        units = grid[:, : width * cs].reshape(b * width, cs, self.num_heads, self.head_dim)
        index = self._lookup(bank, store, ids.view(b * width, kk))
        out = self._read(units, store.keys, store.values, index, weights.view(b * width, kk))
        out = torch.cat([out.reshape(b, width * cs, self.num_heads, self.head_dim),
                         out.new_zeros(b, 1, self.num_heads, self.head_dim)], dim=1)
        out = out.gather(1, slot[..., None, None].expand_as(query))
        new_length = length + m.sum(1)
        last = torch.div(new_length - 1, cs, rounding_mode="floor").clamp(min=lo, max=hi) - lo
        seen = m.sum(1) > 0
        arange = torch.arange(b, device=x.device)
        last_ids, last_w = ids[arange, last], weights[arange, last]
        if "ids" in state:
            last_ids = torch.where(seen[:, None], last_ids, state["ids"])
            last_w = torch.where(seen[:, None], last_w, state["weights"])
        state.update(sum=total + xm.sum(1), length=new_length, ids=last_ids, weights=last_w)
        return out

    def _document_read(self, x, query, real, doc_start, bank, state, store) -> torch.Tensor:
        """``document`` routing (each document routes on the mean of its real tokens) and ``chunk`` routing within
        documents (a chunk routes on the mean of its document's real tokens before it). Mirrors
        ``moc_megatron.memory.documents.DocumentUnits``: units are read in pieces of ``chunk_size`` tokens. ``state``
        carries the current document's running sum and length and the route of the unit under way, so a unit
        continued by the next call (decoding) keeps its route; a document keeps the route of its first call."""
        b, s, hid = x.shape
        cfg = self.config
        piece_len, chunked = cfg.chunk_size, cfg.routing_unit == "chunk"
        if doc_start is None:  # no separator: each row is one document
            doc_start = real & (torch.cumsum(real.long(), 1) == 1) & ("ids" not in state)
        acc = torch.promote_types(x.dtype, torch.float32)
        m = real.long()
        xm = x.to(acc) * m.unsqueeze(-1)
        idx = torch.arange(s, device=x.device).expand(b, s)
        count_before = torch.cumsum(m, 1) - m  # real tokens of this call before each token
        sum_before = torch.cumsum(xm, 1) - xm
        start = torch.where(doc_start, idx, -1).cummax(1).values  # this call's start of each token's document
        cont = start < 0  # the document under way when the last call ended
        start = start.clamp(min=0)
        length = state.get("length", torch.zeros(b, dtype=torch.long, device=x.device))
        total = state.get("sum", x.new_zeros(b, hid, dtype=acc))
        pos = torch.where(cont, length[:, None] + count_before, count_before - count_before.gather(1, start))
        before = torch.where(cont[..., None], total[:, None] + sum_before,
                             sum_before - sum_before.gather(1, start[..., None].expand(b, s, hid)))
        unit_start = real & (doc_start | (chunked & (pos % piece_len == 0)))
        unit = torch.cumsum(unit_start.long(), 1)  # 0: the unit under way when the last call ended
        piece = torch.cumsum((real & ((pos % piece_len == 0) | unit_start)).long(), 1)
        if not real.any():
            return torch.zeros_like(query)
        num_units, width = int(unit.max()) + 1, int(piece.max()) + 1
        kk = cfg.num_shared_chapters + cfg.memory_top_k
        ids = torch.zeros(b, num_units, kk, dtype=torch.long, device=x.device)
        weights = torch.zeros(b, num_units, kk, dtype=acc, device=x.device)
        if "ids" in state:
            ids[:, 0], weights[:, 0] = state["ids"], state["weights"]
        rows, cols = unit_start.nonzero(as_tuple=True)
        if rows.numel():
            if chunked:
                feats = before[rows, cols] / pos[rows, cols].clamp(min=1).unsqueeze(-1).to(acc)
            else:
                flat_unit = (torch.arange(b, device=x.device)[:, None] * num_units + unit).flatten()
                sums = xm.new_zeros(b * num_units, hid).index_add_(0, flat_unit, xm.reshape(b * s, hid))
                counts = xm.new_zeros(b * num_units).index_add_(0, flat_unit, m.flatten().to(acc))
                chosen = rows * num_units + unit[rows, cols]
                feats = sums[chosen] / counts[chosen].clamp(min=1).unsqueeze(-1)
            ids[rows, unit[rows, cols]], weights[rows, unit[rows, cols]] = self._route(feats)
        # Queries into a [b, width * piece_len] grid of pieces (padding goes to a spare slot).
        slot = torch.where(real, piece * piece_len + pos % piece_len, width * piece_len)
        piece_unit = torch.zeros(b, width + 1, dtype=torch.long, device=x.device)
        piece_unit.scatter_(1, torch.where(real, piece, width), unit)
        piece_unit = piece_unit[:, :width, None].expand(b, width, kk)
        grid = query.new_zeros(b, width * piece_len + 1, self.num_heads, self.head_dim)
        grid.scatter_(1, slot[..., None, None].expand_as(query), query)
        units = grid[:, : width * piece_len].reshape(b * width, piece_len, self.num_heads, self.head_dim)
        index = self._lookup(bank, store, ids.gather(1, piece_unit).view(b * width, kk))
        out = self._read(units, store.keys, store.values, index, weights.gather(1, piece_unit).view(b * width, kk))
        out = torch.cat([out.reshape(b, width * piece_len, self.num_heads, self.head_dim),
                         out.new_zeros(b, 1, self.num_heads, self.head_dim)], dim=1)
        out = out.gather(1, slot[..., None, None].expand_as(query))
        seen = real.any(1)
        last = torch.where(real, idx, -1).max(1).values.clamp(min=0)
        arange = torch.arange(b, device=x.device)
        last_unit = unit[arange, last]
        new_ids, new_w = ids[arange, last_unit], weights[arange, last_unit]
        new_length = pos[arange, last] + 1
        new_sum = before[arange, last] + xm[arange, last]
        if "ids" in state:
            new_ids = torch.where(seen[:, None], new_ids, state["ids"])
            new_w = torch.where(seen[:, None], new_w, state["weights"])
        state.update(ids=new_ids, weights=new_w, length=torch.where(seen, new_length, length),
                     sum=torch.where(seen[:, None], new_sum, total))
        return out


class MoCDecoderLayer(nn.Module):
    """Self-attention, the memory read (memory layers only) and the MLP, each with a pre-RMSNorm."""

    def __init__(self, config: MoCConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoCSelfAttention(config, layer_idx)
        self.has_memory = layer_idx in config.memory_layers
        if self.has_memory:
            self.memory_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.memory = MoCMemoryAttention(config)
        self.post_attention_layernorm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoCMLP(config)

    def forward(self, h, rope, mask, real, cache, bank, memory_state, doc_start=None):
        """One decoder layer on ``h`` ``[b, s, hidden]``."""
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        if self.has_memory:
            h = h + self.memory(self.memory_layernorm(h), real, bank, memory_state, doc_start)
        return h + self.mlp(self.post_attention_layernorm(h))


class MoCPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the flags transformers reads."""

    config_class = MoCConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoCDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, MoCRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, MoCMemoryBank):
            module.shared.normal_(0.0, self.config.bank_init_std)
            module.routed.normal_(0.0, self.config.bank_init_std)
        if isinstance(module, MoCMemoryAttention):
            module.o_proj.weight.zero_()  # a new memory layer starts as the identity


def _memory_states(cache: Cache | None, num_layers: int) -> list[dict | None]:
    """Per-layer memory state kept on the generation cache object (``None`` entries without a cache)."""
    if cache is None:
        return [None] * num_layers
    states = getattr(cache, "_moc_memory", None)
    if states is None or cache.get_seq_length() == 0:
        states = [{} for _ in range(num_layers)]
        cache._moc_memory = states
    return states


class MoCModel(MoCPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: MoCConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoCRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.memory_bank = MoCMemoryBank(config) if config.memory_layers and config.shared_bank else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.embed_tokens = value

    def _real_tokens(self, input_ids, attention_mask, b, s, past, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real [b, s] of this call, key_valid [b, past + s])`` from the mask (or the pad id)."""
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past + s:
                raise ValueError(f"attention_mask must be [batch, past + new tokens] = [{b}, {past + s}], "
                                 f"got {list(attention_mask.shape)}")
            valid = attention_mask.bool()
            return valid[:, past:], valid
        pad = getattr(self.config, "padding_id_without_mask", None)
        if input_ids is not None and past == 0 and pad is not None:
            real = ~torch.cumprod((input_ids == pad).flip(1).long(), dim=1).flip(1).bool()  # trailing run = padding
            return real, real
        ones = torch.ones(b, past + s, dtype=torch.bool, device=device)
        return ones[:, past:], ones

    def _documents(self, input_ids, real, b, s, past, cache, device) -> dict | None:
        """Where documents start, for ``document`` routing or ``reset_attention_mask`` (else ``None``):
        ``{"ids": [b, past + s] document index, "starts": [b, past + s] real tokens that start a document}``,
        kept on the generation cache across calls. A document ends with ``document_separator_id``; without
        ``input_ids`` or a separator, each row is one document."""
        cfg = self.config
        if cfg.routing_unit != "document" and not cfg.reset_attention_mask:
            return None
        state = getattr(cache, "_moc_documents", None) if cache is not None and past > 0 else None
        state = state or {}
        sep = cfg.document_separator_id
        if input_ids is None or sep is None:
            ends = torch.zeros(b, s, dtype=torch.bool, device=device)
        else:
            ends = real & (input_ids == sep)
        after_end = state.get("after_end", torch.ones(b, dtype=torch.bool, device=device))
        idx = torch.arange(s, device=device).expand(b, s)
        last_real = torch.where(real, idx, -1).cummax(dim=1).values  # last real token at or before each token
        prev = torch.cat([last_real.new_full((b, 1), -1), last_real[:, :-1]], dim=1)
        end_before = torch.where(prev >= 0, ends.gather(1, prev.clamp(min=0)), after_end[:, None])
        starts = real & end_before
        count = state.get("count", torch.zeros(b, dtype=torch.long, device=device))
        ids = count[:, None] + torch.cumsum(starts.long(), dim=1)
        past_ids = state.get("ids", ids.new_zeros(b, 0))
        past_starts = state.get("starts", starts.new_zeros(b, 0))
        out = {"ids": torch.cat([past_ids, ids], dim=1), "starts": torch.cat([past_starts, starts], dim=1)}
        if cache is not None:
            seen = real.any(dim=1)
            last_end = ends.gather(1, last_real[:, -1:].clamp(min=0)).squeeze(1)
            cache._moc_documents = {**out, "count": ids[:, -1],
                                    "after_end": torch.where(seen, last_end, after_end)}
        return out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs) -> BaseModelOutputWithPast:
        """Hidden states of ``input_ids`` (or ``inputs_embeds``) ``[b, s]``; updates the cache."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        real, key_valid = self._real_tokens(input_ids, attention_mask, b, s, past, h.device)
        cfg = self.config
        docs = self._documents(input_ids, real, b, s, past, cache, h.device)
        if position_ids is None:
            counts = torch.cumsum(key_valid.long(), dim=1) - 1
            if docs is not None and cfg.reset_attention_mask:  # count from each document's first real token
                first = torch.where(docs["starts"] & key_valid, counts, -1).cummax(dim=1).values
                counts = counts - first.clamp(min=0)
            position_ids = counts[:, past:].clamp(min=0)
        rope = _rope(position_ids, cfg.head_dim, cfg.rope_parameters, h.dtype)
        q_idx = torch.arange(s, device=h.device)[:, None] + past
        k_idx = torch.arange(past + s, device=h.device)[None, :]
        allowed = (k_idx <= q_idx)[None] & key_valid[:, None, :]
        if docs is not None and cfg.reset_attention_mask:
            allowed = allowed & (docs["ids"][:, past:, None] == docs["ids"][:, None, :])
        mask = allowed | (k_idx == q_idx)[None]
        mask = mask[:, None]  # [b, 1, s, past + s]; a query always sees itself (padding stays finite)
        states = _memory_states(cache, len(self.layers))
        doc_start = None if docs is None else docs["starts"][:, past:]
        for layer, state in zip(self.layers, states):
            h = layer(h, rope, mask, real, cache, self.memory_bank, state, doc_start)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{_CACHE_FIELD: cache})


class MoCForCausalLM(MoCPreTrainedModel, GenerationMixin):
    """MoC language model: ``model(input_ids, attention_mask=...)`` returns logits; ``generate()`` works."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoCConfig) -> None:
        super().__init__(config)
        self.model = MoCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the LM head."""
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[b, s, vocab]`` (the last ``logits_to_keep`` positions if non-zero); loss with ``labels``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache=cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
