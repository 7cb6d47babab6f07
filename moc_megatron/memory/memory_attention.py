"""The MoC memory read, filling megatron's ``cross_attention`` slot of a TransformerLayer.

route -> dispatch -> chapter attention (output + log-sum-exp) -> combine -> W_O. With expert
parallelism the dispatcher adds an all-to-all; the math is the same on one process.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from moc_megatron.config import MoCConfig
from moc_megatron.kernels.choice import choose_read
from moc_megatron.kernels.projected import ChapterSource, projected_chapter_attention
from moc_megatron.memory.aux_losses import attach_router_losses
from moc_megatron.memory.bank import MemoryBank
from moc_megatron.memory.chapter_attention import chapter_attention
from moc_megatron.memory.dispatcher import CommBytes, Dispatched, all_to_all_bytes, make_dispatcher
from moc_megatron.memory.documents import DocumentUnits
from moc_megatron.memory.norm import MemoryRMSNorm
from moc_megatron.memory.router import ChapterRouter, chapter_weights
from moc_megatron.memory.units import RoutingUnits
from moc_megatron.parallel.groups import MemoryGroups, memory_groups


@dataclass
class MoCMemorySubmodules:
    """The memory read's linears and norms, as megatron's ``SelfAttentionSubmodules`` for attention.

    Defaults are the local spec (megatron's tensor-parallel linears, torch's RMSNorm); the Transformer Engine
    spec (:func:`moc_megatron.model.layer_specs.te_memory_submodules`) gives TE's, so FP8 under megatron's fp8
    context covers the memory projections. Either way the checkpoint keys are the same.
    """

    linear_q: ModuleSpec | type = ColumnParallelLinear
    linear_k: ModuleSpec | type = ColumnParallelLinear
    linear_v: ModuleSpec | type = ColumnParallelLinear
    linear_o: ModuleSpec | type = RowParallelLinear
    shared_norm: ModuleSpec | type = MemoryRMSNorm
    routed_norm: ModuleSpec | type = MemoryRMSNorm


class MoCMemoryAttention(MegatronModule):
    """Cross-attention of the hidden states to the selected chapters of a memory bank.

    Memory heads are split over tensor-parallel ranks like self-attention heads (``W_Q``, ``W_K``,
    ``W_V`` column-parallel, ``W_O`` row-parallel and zero-initialised). The bank is either this
    layer's own (``moc_shared_bank=False``) or the model's shared bank, set with
    :meth:`set_shared_bank`. Process groups come from megatron's ``pg_collection`` (the
    ``TransformerLayer`` passes its own), else from ``parallel_state``.
    """

    def __init__(self, config: MoCConfig, layer_number: int, submodules: MoCMemorySubmodules | None = None,
                 pg_collection=None, **kwargs) -> None:
        super().__init__(config=config)
        submodules = MoCMemorySubmodules() if submodules is None else submodules
        self.layer_number = layer_number
        self.groups: MemoryGroups = memory_groups(pg_collection)
        tp = self.groups.tp_size
        self.num_heads = config.moc_num_heads // tp
        self.num_groups = config.moc_num_query_groups // tp
        self.head_dim = config.moc_head_dim
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)
        # Memory tokens are not a sequence: the K/V (and the already-gathered Q) projections must not
        # gather along dim 0 under sequence parallelism.
        plain = copy.copy(config)
        plain.sequence_parallel = False
        linear = dict(config=plain, init_method=config.init_method, bias=False, gather_output=False,
                      skip_bias_add=False, is_expert=False, tp_group=self.groups.tp)
        q_width = config.moc_num_heads * self.head_dim
        kv_width = config.moc_num_query_groups * self.head_dim
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, q_width, **linear,
                                     tp_comm_buffer_name="moc_q")
        self.linear_k = build_module(submodules.linear_k, config.moc_bank_dim, kv_width, **linear,
                                     tp_comm_buffer_name="moc_k")
        self.linear_v = build_module(submodules.linear_v, config.moc_bank_dim, kv_width, **linear,
                                     tp_comm_buffer_name="moc_v")
        self.linear_o = build_module(
            submodules.linear_o,
            q_width,
            config.hidden_size,
            config=config,
            init_method=torch.nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="moc_o",
            tp_group=self.groups.tp,
        )
        self.shared_norm = build_module(submodules.shared_norm, config=config, hidden_size=config.moc_bank_dim,
                                        eps=config.layernorm_epsilon)
        self.routed_norm = build_module(submodules.routed_norm, config=config, hidden_size=config.moc_bank_dim,
                                        eps=config.layernorm_epsilon)
        self.router = ChapterRouter(config, layer_number=layer_number)
        # Without document ids a document is the whole sequence.
        fixed_unit = "sequence" if config.moc_routing_unit == "document" else config.moc_routing_unit
        self.units = RoutingUnits(fixed_unit, config.moc_chunk_size)
        groups = self.groups
        self.own_bank = None if config.moc_shared_bank else MemoryBank(config, groups=groups)
        self._shared_bank: list[MemoryBank] = []
        self.dispatcher = make_dispatcher(config.moc_num_routed_chapters, groups.ep_rank, groups.ep_size, groups.ep)
        self._comm = CommBytes()

    def set_shared_bank(self, bank: MemoryBank) -> None:
        """Read the model's shared bank (kept outside this module's parameters)."""
        self._shared_bank = [bank]

    @property
    def bank(self) -> MemoryBank:
        """The bank this layer reads."""
        if self.own_bank is not None:
            return self.own_bank
        if not self._shared_bank:
            raise RuntimeError(f"memory layer {self.layer_number} has no bank: call set_shared_bank()")
        return self._shared_bank[0]

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, key_value_states=None,
                inference_context=None, **kwargs) -> tuple[torch.Tensor, None]:
        """Memory read of ``hidden_states`` ``[s, b, h]`` (sequence-sharded under SP).

        ``key_value_states`` (megatron's cross-attention context, which the model fills with
        ``document_ids`` ``[b, s]`` of packed documents, or ``None``) decides the routing units with
        :meth:`routing_layout`.
        """
        cfg = self.config
        if cfg.sequence_parallel and self.groups.tp_size > 1:
            # W_Q's column-parallel backward already all-reduces its input gradient and the router's
            # is complete on every rank, so the gather's backward keeps this rank's slice, no sum.
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=self.groups.tp)
        s, b, _ = hidden_states.shape
        training = self.training and torch.is_grad_enabled()
        layout = self.routing_layout(key_value_states)

        routing = self.router(layout.pool(hidden_states))
        shared_w, routed_w = chapter_weights(routing, cfg)
        # Each tensor-parallel rank sees only its heads' share of the weights' gradient. Applied to the cat:
        # megatron's all-reduce of a non-contiguous gradient (a slice of cat's) would be lost.
        weights = copy_to_tensor_model_parallel_region(torch.cat([shared_w, routed_w], dim=1), group=self.groups.tp)
        # Ragged units (documents) are read as fixed-length pieces carrying their unit's route.
        chapters, weights = layout.per_piece(routing.chapters), layout.per_piece(weights)

        query = self.linear_q(hidden_states)[0].view(s, b, self.num_heads, self.head_dim)
        sent = self.dispatcher.dispatch(layout.split(query), chapters, weights, cfg.moc_num_shared_chapters)
        out, lse = self._read(sent, need_lse=sent.plan.merges)
        if training:
            self._comm = self._comm + all_to_all_bytes(sent, out[: sum(sent.plan.recv_splits)],
                                                       None if lse is None else lse[: sum(sent.plan.recv_splits)])
        out = self.dispatcher.combine(sent.plan, out, lse)
        out = layout.join(out, s, b).reshape(s, b, self.num_heads * self.head_dim)

        output, bias = self.linear_o(out)
        if training:
            self.router.record_load(routing)
            output = attach_router_losses(output, routing, cfg, self.layer_number)
        return output, bias

    def routing_layout(self, document_ids: torch.Tensor | None) -> RoutingUnits | DocumentUnits:
        """The routing units of this forward: documents (``document``), chunks restarting at every document start
        (``chunk`` with ``reset_attention_mask``: documents separated) when ``document_ids`` ``[b, s]`` are given;
        otherwise the fixed layout of ``--moc-routing-unit`` (a ``document`` is then the whole sequence)."""
        unit = self.config.moc_routing_unit
        separated = unit == "document" or (unit == "chunk" and self.config.reset_attention_mask)
        if document_ids is None or not separated:
            return self.units
        if not isinstance(document_ids, torch.Tensor) or document_ids.dim() != 2:
            raise TypeError("the memory read's context must be document ids [batch, sequence] or None")
        return DocumentUnits.build(document_ids, unit, self.config.moc_chunk_size)

    def compute_comm_metrics(self, reset: bool = False) -> CommBytes:
        """Bytes this rank's memory all-to-alls sent to other ranks in training forwards (and their backwards)
        since the last reset; from the dispatch plans, no communication. Zero without expert parallelism."""
        comm = self._comm
        if reset:
            self.reset_comm_metrics()
        return comm

    def reset_comm_metrics(self) -> None:
        """Start counting the all-to-all bytes from zero."""
        self._comm = CommBytes()

    def _read(self, sent: Dispatched, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out, lse)`` of the dispatched rows' reads: each row reads the shared chapters (where
        ``sent.reads_shared``) and its routed chapters on this rank, in one softmax over all their tokens.

        K/V of the shared chapters and of every routed chapter with traffic are projected in one matmul, or block
        by block inside the read (:mod:`moc_megatron.kernels.projected`); which implementation runs is
        :func:`moc_megatron.kernels.choice.choose_read`'s decision.
        """
        cfg = self.config
        num_shared = cfg.moc_num_shared_chapters
        used, routed = self._chapters_with_traffic(sent.local_chapters)
        selected = torch.where(routed >= 0, routed + num_shared, -1)
        if num_shared:
            shared = torch.arange(num_shared, device=selected.device).expand(selected.shape[0], num_shared)
            shared = torch.where(sent.reads_shared.unsqueeze(1), shared, -1)
            selected = torch.cat([shared, selected], dim=1)
        query, weights = sent.query, sent.weights
        choice = choose_read(cfg.moc_attention_impl, query, selected, cfg.moc_gating, need_lse,
                             num_shared + used.numel(), cfg.moc_chapter_size, cfg.moc_bank_dim, self.num_groups,
                             self.head_dim)
        if choice.projected:
            return projected_chapter_attention(query, weights, selected, self._sources(used, num_shared > 0),
                                               self._project, self._projection_params(), cfg.moc_gating,
                                               self.softmax_scale, need_lse=need_lse)
        tokens = self.routed_norm(self.bank.routed_rows(used))
        if num_shared:
            tokens = torch.cat([self.shared_norm(self.bank.shared), tokens])
        keys, values = self._project(tokens)
        return chapter_attention(query, keys, values, selected, weights, cfg.moc_gating, self.softmax_scale,
                                 need_lse=need_lse, impl=choice.impl)

    def _project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[c, T, g, e]`` of memory tokens ``[c, T, d]``."""
        c, t, d = tokens.shape
        flat = tokens.reshape(c * t, 1, d)
        shape = (c, t, self.num_groups, self.head_dim)
        return self.linear_k(flat)[0].view(shape), self.linear_v(flat)[0].view(shape)

    def _chapters_with_traffic(self, local_chapters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local routed chapters some unit selected, and the units' indices into them (``-1``: not here)."""
        valid = local_chapters >= 0
        used = torch.unique(local_chapters[valid])
        lookup = torch.full((self.bank.num_local_routed,), -1, dtype=torch.long, device=used.device)
        lookup[used] = torch.arange(used.numel(), device=used.device)
        return used, torch.where(valid, lookup[local_chapters.clamp(min=0)], -1)

    def _sources(self, used: torch.Tensor, shared: bool) -> list[ChapterSource]:
        """The chapters a unit's ``selected`` indexes: the shared ones (if ``shared``), then the routed ``used``."""
        bank = self.bank
        routed = ChapterSource(bank.routed, used, self.routed_norm)
        if not shared:
            return [routed]
        ids = torch.arange(bank.shared.shape[0], device=used.device)
        return [ChapterSource(bank.shared, ids, self.shared_norm), routed]

    def _projection_params(self) -> list[torch.Tensor]:
        """Parameters of the K/V projections and the memory norms (their gradients flow through the read)."""
        modules = (self.linear_k, self.linear_v, self.routed_norm, self.shared_norm)
        return [p for m in modules for p in m.parameters() if p.requires_grad]
