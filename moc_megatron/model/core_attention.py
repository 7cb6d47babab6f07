"""Core attention for megatron's local (non-Transformer-Engine) layer spec, on torch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) grouped-query attention through ``scaled_dot_product_attention``.

    Drop-in for ``SelfAttentionSubmodules.core_attention``: takes ``[s, b, heads, d]`` query and
    ``[s, b, groups, d]`` key/value and returns ``[s, b, heads * d]``. ``attention_mask`` follows
    megatron's convention (``True`` = masked out, shape ``[b, 1, s, s]``); without one the attention
    is causal.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, **kwargs) -> None:
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs) -> torch.Tensor:
        """Attention over ``[s, b, h, d]`` tensors; returns ``[s, b, h * d]``."""
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed (THD) sequences need Transformer Engine; pass a block-causal attention_mask instead"
            )
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != h:
            k = k.repeat_interleave(h // k.shape[1], dim=1)
            v = v.repeat_interleave(h // v.shape[1], dim=1)
        dropout = self.dropout if self.training else 0.0
        mask = None if attention_mask is None else ~attention_mask
        if dropout > 0 and not self.config.sequence_parallel:
            # Heads are split over tensor-parallel ranks: each rank draws its own dropout mask, from
            # the model-parallel RNG stream, as megatron's DotProductAttention does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(q, k, v, mask, dropout)
        else:
            out = self._attend(q, k, v, mask, dropout)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _attend(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=dropout, scale=self.softmax_scale)
