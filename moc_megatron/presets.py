"""Named model presets: the paper's three models (Table 5) and a CPU-sized one.

A preset is typed: :class:`Backbone` and :class:`Memory` carry ``MoCConfig`` field names (so
:attr:`Preset.config` is their fields, plus the SwiGLU activation), and :class:`Preset` adds the
model-level settings megatron keeps outside ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F

from moc_megatron.config import Gating, RoutingUnit


@dataclass(frozen=True)
class Backbone:
    """The transformer of a preset (``MoCConfig``/``TransformerConfig`` field names)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    gated_linear_unit: bool = True
    """A gated MLP; the presets' gated MLPs are SwiGLU (``--swiglu``)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    add_bias_linear: bool = False


@dataclass(frozen=True)
class Memory:
    """The Mixture-of-Chapters memory of a preset (``MoCConfig``'s ``moc_`` field names)."""

    moc_memory_layers: tuple[int, ...]
    moc_num_chapters: int
    moc_chapter_size: int
    moc_top_k: int
    moc_num_heads: int
    moc_num_query_groups: int
    moc_num_shared_chapters: int = 1
    moc_routing_unit: RoutingUnit = "sequence"
    moc_gating: Gating = "paper"
    moc_routed_scaling_factor: float = 2.5
    moc_shared_bank: bool = True


@dataclass(frozen=True)
class Training:
    """Training defaults of a preset (``pretrain_moc.py`` flag destinations; ``None``: the flag's own default),
    so that ``--preset NAME`` with a data source is a complete command line."""

    lr: float | None = None
    micro_batch_size: int | None = None
    train_iters: int | None = None

    def defaults(self) -> dict[str, Any]:
        """The values this preset sets (flag destination -> value)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Preset:
    """A named model: its backbone, its memory (``None``: dense) and the model-level settings."""

    name: str
    description: str
    backbone: Backbone
    memory: Memory | None
    vocab_size: int
    seq_length: int
    tie_embeddings: bool = True
    rotary_base: int = 10000
    training: Training = Training()

    @property
    def config(self) -> dict[str, Any]:
        """The ``MoCConfig`` keyword arguments of this preset (a new dict on every call)."""
        fields = dataclasses.asdict(self.backbone)
        if self.backbone.gated_linear_unit:
            fields["activation_func"] = F.silu
        if self.memory is not None:
            memory = dataclasses.asdict(self.memory)
            memory["moc_memory_layers"] = list(self.memory.moc_memory_layers)
            fields.update(memory)
        return fields


_PAPER_BACKBONE = Backbone(num_layers=16, hidden_size=768, num_attention_heads=12, num_query_groups=4,
                           ffn_hidden_size=2304)
_PAPER_MEMORY = Memory(moc_memory_layers=(2, 6, 10, 14), moc_num_chapters=4097, moc_chapter_size=64,
                       moc_top_k=64, moc_num_heads=12, moc_num_query_groups=12)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="moc-paper",
            description="The paper's MoC model (Table 5): 16 layers, d=768, 4097x64-token bank, top-64.",
            backbone=_PAPER_BACKBONE,
            memory=_PAPER_MEMORY,
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="dense-paper-backbone",
            description="The paper's backbone-only baseline: the MoC model without memory (16 layers).",
            backbone=_PAPER_BACKBONE,
            memory=None,
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="dense-paper-iso",
            description="The paper's iso-FLOP dense baseline (24 layers).",
            backbone=dataclasses.replace(_PAPER_BACKBONE, num_layers=24),
            memory=None,
            vocab_size=49152,
            seq_length=1024,
            rotary_base=100000,
        ),
        Preset(
            name="moc-tiny",
            description="A small MoC model that trains in minutes on a CPU (quick start, tests).",
            backbone=Backbone(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=384),
            memory=Memory(moc_memory_layers=(1, 3), moc_num_chapters=65, moc_chapter_size=16, moc_top_k=4,
                          moc_num_heads=4, moc_num_query_groups=4),
            vocab_size=4096,
            seq_length=256,
            # the quick start's peak LR; 200 iterations of 8 sequences take a few minutes on a CPU
            training=Training(lr=2e-3, micro_batch_size=8, train_iters=200),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with the list of valid names in the error."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
