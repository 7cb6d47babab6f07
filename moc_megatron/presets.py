"""Named model presets: the paper's three models (Table 5) and a CPU-sized one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F

_PAPER_BACKBONE: dict[str, Any] = dict(
    num_layers=16,
    hidden_size=768,
    num_attention_heads=12,
    num_query_groups=4,
    ffn_hidden_size=2304,
    gated_linear_unit=True,
    activation_func=F.silu,
    normalization="RMSNorm",
    add_bias_linear=False,
)

_PAPER_MEMORY: dict[str, Any] = dict(
    moc_memory_layers=[2, 6, 10, 14],
    moc_num_chapters=4097,
    moc_chapter_size=64,
    moc_num_shared_chapters=1,
    moc_top_k=64,
    moc_num_heads=12,
    moc_num_query_groups=12,
    moc_routing_unit="sequence",
    moc_gating="paper",
    moc_routed_scaling_factor=2.5,
    moc_shared_bank=True,
)


@dataclass(frozen=True)
class Preset:
    """A named model: MoCConfig fields plus the model-level settings megatron keeps outside it."""

    name: str
    description: str
    config: dict[str, Any]
    vocab_size: int
    seq_length: int
    tie_embeddings: bool = True
    rotary_base: int = 10000
    training: dict[str, Any] = field(default_factory=dict)
    """Suggested training flags (argument name -> value) used when the user does not set them."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="moc-paper",
            description="The paper's MoC model (Table 5): 16 layers, d=768, 4097x64-token bank, top-64.",
            config={**_PAPER_BACKBONE, **_PAPER_MEMORY},
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="dense-paper-backbone",
            description="The paper's backbone-only baseline: the MoC model without memory (16 layers).",
            config=dict(_PAPER_BACKBONE),
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="dense-paper-iso",
            description="The paper's iso-FLOP dense baseline (24 layers).",
            config={**_PAPER_BACKBONE, "num_layers": 24},
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="moc-tiny",
            description="A small MoC model that trains in minutes on a CPU (quick start, tests).",
            config=dict(
                num_layers=4,
                hidden_size=128,
                num_attention_heads=4,
                num_query_groups=2,
                ffn_hidden_size=384,
                gated_linear_unit=True,
                activation_func=F.silu,
                normalization="RMSNorm",
                add_bias_linear=False,
                moc_memory_layers=[1, 3],
                moc_num_chapters=65,
                moc_chapter_size=16,
                moc_num_shared_chapters=1,
                moc_top_k=4,
                moc_num_heads=4,
                moc_num_query_groups=4,
                moc_routing_unit="sequence",
                moc_gating="paper",
                moc_routed_scaling_factor=2.5,
                moc_shared_bank=True,
            ),
            vocab_size=4096,
            seq_length=256,
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with the list of valid names in the error."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
