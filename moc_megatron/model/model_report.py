"""Parameters and FLOPs of a named preset: the report ``tools/estimate_flops.py`` prints.

Parameters are read from the real :class:`~moc_megatron.model.moc_model.MoCGPTModel`, built on the meta
device (no memory, no initialisation), so the count is the model's own; FLOPs come from the rules of
:mod:`moc_megatron.model.flops`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from moc_megatron.config import MoCConfig
from moc_megatron.model.flops import FlopCount, estimate_flops, memory_tokens_selected
from moc_megatron.presets import Preset, get_preset

if TYPE_CHECKING:
    from moc_megatron.model.moc_model import MoCGPTModel


# ----------------------------------------------------------------------------------------------------------
# Parameters, from the real model on the meta device
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model, tied embeddings counted once."""

    total: int
    backbone: int
    """Everything but the bank and the memory layers' own parameters (embeddings included)."""
    bank: int
    """Memory-bank tokens (shared and routed chapters, every bank)."""
    memory_layers: int
    """Memory reads: W_Q, W_K, W_V, W_O, router, memory RMSNorms and the pre-memory RMSNorm."""


def preset_config(preset: Preset, **overrides: Any) -> MoCConfig:
    """The :class:`MoCConfig` of a preset for accounting: SwiGLU MLP, fp32, no initialisation, CPU-only fields."""
    fields: dict[str, Any] = dict(preset.config)
    if fields.get("gated_linear_unit"):
        fields.update(activation_func=F.silu, bias_activation_fusion=False)  # the presets' GLUs are SwiGLU
    fields.update(
        use_cpu_initialization=True, perform_initialization=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False,
    )
    fields.update(overrides)
    return MoCConfig(**fields)


def padded_vocab_size(preset: Preset) -> int:
    """The preset's vocabulary padded as the training path pads it (multiple of 128)."""
    from moc_megatron.model.builder import pad_vocab_size

    return pad_vocab_size(preset.vocab_size)


def build_meta_model(preset: Preset, seq_length: int | None = None,
                     config: MoCConfig | None = None) -> MoCGPTModel:
    """The preset's MoCGPTModel on the meta device: real module structure, no storage, built in well under a second.

    Initialises a one-process megatron parallel state if none exists (model construction needs it).
    """
    from megatron.core import parallel_state

    from moc_megatron.model.moc_model import MoCGPTModel

    if not parallel_state.model_parallel_is_initialized():
        from moc_megatron.platform import initialize_distributed

        initialize_distributed()
    config = config if config is not None else preset_config(preset)
    with torch.device("meta"):
        return MoCGPTModel(
            config, padded_vocab_size(preset), seq_length or preset.seq_length,
            tie_embeddings=preset.tie_embeddings, rotary_base=preset.rotary_base, use_te=False,
        )


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    """Split a model's parameters into backbone, bank and memory layers (shared tensors counted once)."""
    from moc_megatron.memory.bank import MemoryBank
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

    bank_ids: set[int] = set()
    memory_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, MemoryBank):
            bank_ids.update(id(p) for p in module.parameters())
    for module in model.modules():
        if isinstance(module, MoCMemoryAttention):
            memory_ids.update(id(p) for p in module.parameters() if id(p) not in bank_ids)
        norm = getattr(module, "pre_cross_attn_layernorm", None)
        if isinstance(getattr(module, "cross_attention", None), MoCMemoryAttention) and norm is not None:
            memory_ids.update(id(p) for p in norm.parameters())
    total = bank = memory = 0
    for p in model.parameters():  # deduplicated: a tied output layer is the embedding
        total += p.numel()
        if id(p) in bank_ids:
            bank += p.numel()
        elif id(p) in memory_ids:
            memory += p.numel()
    return ParameterCounts(total=total, backbone=total - bank - memory, bank=bank, memory_layers=memory)


# ----------------------------------------------------------------------------------------------------------
# One call for the tool
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Parameters and per-sequence FLOPs of a preset."""

    preset: str
    seq_length: int
    vocab_size: int
    parameters: ParameterCounts
    flops: FlopCount
    paper_flops: FlopCount | None = None
    """The same count with the paper's router convention (memory models only)."""
    architecture: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""

        def flops(count: FlopCount) -> dict[str, Any]:
            return {
                "forward": count.forward,
                "backward": count.backward,
                "forward_backward": count.forward_backward,
                "components": dict(count.components),
                "layers": list(count.layers),
                "head": count.head,
            }

        out: dict[str, Any] = {
            "preset": self.preset,
            "seq_length": self.seq_length,
            "batch_size": 1,
            "vocab_size": self.vocab_size,
            "architecture": self.architecture,
            "parameters": asdict(self.parameters),
            "flops_per_sequence": flops(self.flops),
        }
        if self.paper_flops is not None:
            out["flops_per_sequence_paper_convention"] = flops(self.paper_flops)
        return out


def estimate_preset(name: str, seq_length: int | None = None, routing_unit: str | None = None,
                    micro_batch_size: int = 1, documents: float = 1.0) -> Estimate:
    """Parameters (from the model on the meta device) and FLOPs per sequence of a named preset (optionally with
    another routing unit, in micro-batches of ``micro_batch_size`` sequences of ``documents`` documents)."""
    preset = get_preset(name)
    length = seq_length or preset.seq_length
    config = preset_config(preset, **({"moc_routing_unit": routing_unit} if routing_unit else {}))
    params = count_parameters(build_meta_model(preset, length, config))
    vocab = padded_vocab_size(preset)
    flops = estimate_flops(config, vocab, length, micro_batch_size=micro_batch_size, documents=documents)
    paper = estimate_flops(config, vocab, length, paper_convention=True, micro_batch_size=micro_batch_size,
                           documents=documents) if config.has_memory else None
    arch: dict[str, Any] = {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups,
        "ffn_hidden_size": config.ffn_hidden_size,
        "memory_layers": list(config.moc_memory_layers),
    }
    if config.has_memory:
        arch.update(
            num_chapters=config.moc_num_chapters, chapter_size=config.moc_chapter_size,
            num_shared_chapters=config.moc_num_shared_chapters, top_k=config.moc_top_k,
            memory_heads=config.moc_num_heads, memory_query_groups=config.moc_num_query_groups,
            routing_unit=config.moc_routing_unit, gating=config.moc_gating,
            selected_memory_tokens=memory_tokens_selected(config),
        )
    return Estimate(name, length, vocab, params, flops, paper, arch)
