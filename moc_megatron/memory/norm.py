"""RMSNorm of the memory tokens (the paper's normalisation of the shared and routed halves of a read).

Always RMSNorm, whatever ``config.normalization`` says, and never sequence-parallel: memory tokens are not
a sequence.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class MemoryRMSNorm:
    """RMSNorm of memory tokens for the local spec: a plain ``torch.nn.RMSNorm`` (parameter ``weight``).

    Memory tokens are not a sequence, so no sequence-parallel tagging; under tensor parallelism the full
    gradient reaches the norm through the column-parallel K/V projections' input all-reduce.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
        return torch.nn.RMSNorm(hidden_size, eps=eps)


class TEMemoryRMSNorm:
    """RMSNorm of memory tokens for the Transformer Engine spec: TE's RMSNorm (parameter ``weight``).

    Always RMSNorm (the paper's memory normalisation, whatever ``config.normalization`` says) and never
    sequence-parallel. Needs Transformer Engine, i.e. a GPU.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> torch.nn.Module:
        from megatron.core.extensions.transformer_engine import TENorm

        plain = copy.copy(config)
        plain.normalization = "RMSNorm"
        plain.sequence_parallel = False
        return TENorm(plain, hidden_size, eps)
