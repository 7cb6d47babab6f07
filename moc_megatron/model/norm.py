"""RMSNorm/LayerNorm for the local layer spec that also works under sequence parallelism."""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalNorm(torch.nn.Module):
    """torch's RMSNorm or LayerNorm, per ``config.normalization``.

    Unlike megatron's ``WrappedTorchNorm`` it allows sequence parallelism: its parameters are
    tagged ``sequence_parallel`` so megatron all-reduces their gradients over the tensor-parallel
    group, as it does for its fused norms.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__()
        if config.normalization == "RMSNorm":
            self.norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            self.norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.norm.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return self.norm(x)


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
