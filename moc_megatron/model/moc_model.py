"""MoCGPTModel: megatron-core's GPTModel whose memory layers read a (shared) chapter bank."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from moc_megatron.config import MoCConfig
from moc_megatron.memory.bank import MemoryBank
from moc_megatron.memory.documents import block_causal_mask, positions_in_documents
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.model.layer_specs import block_spec
from moc_megatron.parallel.groups import memory_groups


class MoCGPTModel(GPTModel):
    """A decoder-only MoC language model (RMSNorm, RoPE, GQA, SwiGLU, memory cross-attention).

    With ``moc_shared_bank`` one :class:`MemoryBank` lives on this module as ``memory_bank`` (on every
    pipeline stage that has a memory layer) and every local memory layer reads it. ``pg_collection`` is
    megatron's ``ProcessGroupCollection``; it reaches the memory layers through megatron's blocks and
    layers, and the bank takes its groups from it (both default to ``parallel_state``'s groups).
    """

    def __init__(self, config: MoCConfig, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True, tie_embeddings: bool = True,
                 rotary_base: int = 10000, vp_stage: int | None = None, use_te: bool | None = None,
                 pg_collection=None, rope_scaling: bool = False, rope_scaling_factor: float = 8.0) -> None:
        extra = {} if pg_collection is None else {"pg_collection": pg_collection}
        super().__init__(
            config=config,
            transformer_layer_spec=block_spec(config, use_te=use_te, vp_stage=vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=tie_embeddings,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_scaling_factor,
            vp_stage=vp_stage,
            **extra,
        )
        self.memory_bank = None
        self._rope_positions: torch.Tensor | None = None
        layers = self.memory_layers()
        if layers and config.moc_shared_bank:
            groups = memory_groups(getattr(self, "pg_collection", None))
            self.memory_bank = MemoryBank(config, groups=groups)
            self.memory_bank.pipeline_replica = _bank_pipeline_replica(self)
            for layer in layers:
                layer.set_shared_bank(self.memory_bank)

    def forward(self, input_ids, position_ids, attention_mask, *args, document_ids=None, **kwargs):
        """megatron's ``GPTModel.forward``, plus ``document_ids`` ``[b, s]`` of packed documents (a new document
        starts wherever the id changes): the memory layers route per document (``document`` routing, and
        ``chunk`` routing restarting at document starts with ``reset_attention_mask``), and with
        ``reset_attention_mask`` and no ``attention_mask`` the attention is block-causal within documents."""
        if document_ids is None:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if self.config.reset_attention_mask:
            if attention_mask is None:
                attention_mask = block_causal_mask(document_ids)
            self._rope_positions = positions_in_documents(document_ids)
        extra = dict(kwargs.get("extra_block_kwargs") or {})
        extra["context"] = document_ids  # megatron hands the block's context to every cross-attention
        kwargs["extra_block_kwargs"] = extra
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._rope_positions = None

    def _preprocess(self, *args, **kwargs):
        """megatron's preprocessing; with separated documents, RoPE counts positions from each document's start
        (``[s, b, 1, d]`` rotary angles instead of ``[s, 1, 1, d]``), so a document reads as it would alone."""
        out = super()._preprocess(*args, **kwargs)
        positions = getattr(self, "_rope_positions", None)
        if positions is None or not isinstance(out[1], torch.Tensor):
            return out
        per_row = out[1][:, 0][positions.t()]
        return (out[0], per_row, *out[2:])

    def memory_layers(self) -> list[MoCMemoryAttention]:
        """The memory-read modules of the layers on this stage."""
        return [m for m in self.decoder.modules() if isinstance(m, MoCMemoryAttention)]


def _bank_pipeline_replica(model: MoCGPTModel) -> int:
    """0 on the pipeline stage holding the first memory layer, 1 on other stages (their copies)."""
    config = model.config
    if config.pipeline_model_parallel_size == 1:
        return 0
    first_memory_layer = min(config.moc_memory_layers)
    offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    return 0 if offset <= first_memory_layer < offset + len(model.decoder.layers) else 1

