"""RMSNorm/LayerNorm of the transformer layers for the local layer spec, also under sequence parallelism."""

from __future__ import annotations

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
