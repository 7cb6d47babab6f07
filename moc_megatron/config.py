"""MoCConfig: megatron-core's TransformerConfig plus the Mixture-of-Chapters memory fields.

Every field that megatron-core already has keeps megatron's name; the memory fields start with
``moc_``. ``moc_memory_layers`` holds 0-based layer indices, as in the paper ({2, 6, 10, 14}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron.core.transformer.transformer_config import TransformerConfig

from moc_megatron.platform import megatron_versions

RoutingUnit = Literal["sequence", "document", "chunk", "token"]
Gating = Literal["paper", "mixture"]
AttentionImpl = Literal["auto", "triton", "blocked", "gather"]


@dataclass
class MoCConfig(TransformerConfig):
    """Transformer configuration with a Mixture-of-Chapters memory.

    A model with an empty ``moc_memory_layers`` is an ordinary dense decoder.
    """

    moc_memory_layers: list[int] = field(default_factory=list)
    """0-based indices of the layers that read the memory bank through cross-attention."""

    moc_num_chapters: int = 0
    """Total chapters ``C`` in a bank, shared chapters included."""

    moc_chapter_size: int = 64
    """Memory tokens per chapter ``T``."""

    moc_num_shared_chapters: int = 1
    """The first ``S`` chapters are shared: always read, never routed, replicated on every EP rank."""

    moc_top_k: int = 1
    """Routed chapters selected per routing unit."""

    moc_num_heads: int | None = None
    """Memory query heads (default: ``num_attention_heads``)."""

    moc_num_query_groups: int | None = None
    """Memory key/value heads (default: ``moc_num_heads``)."""

    moc_bank_dim: int | None = None
    """Width ``d`` of a memory token (default: ``hidden_size``)."""

    moc_routing_unit: RoutingUnit = "sequence"
    """``document`` (one route per packed document, pooled over it: the paper's per-sequence routing under
    packing), ``sequence`` (one route per packed window, pooled over it), ``chunk`` or ``token`` (both causal)."""

    moc_chunk_size: int = 64
    """Tokens per routing chunk (``chunk``); with ``document`` routing, the length of the fixed pieces a
    document is read in."""

    moc_gating: Gating = "paper"
    """``paper``: weighted memory tokens in one softmax; ``mixture``: one softmax per chapter."""

    moc_attention_impl: AttentionImpl = "auto"
    """Chapter attention: ``auto`` (Triton on a GPU, blocked on a CPU), ``triton`` (fused kernel), ``blocked``
    (memory-bounded PyTorch: online softmax over blocks of chapters, recomputing backward) or ``gather``
    (the reference: copies every unit's k*T keys and values)."""

    moc_routed_scaling_factor: float = 2.5
    """Multiplier of the routed chapters' router weights before renormalisation (paper gating)."""

    moc_shared_bank: bool = True
    """One bank read by every memory layer (paper) instead of one bank per memory layer."""

    moc_load_balance_coeff: float = 0.01
    """Switch-style load-balancing loss coefficient."""

    moc_z_loss_coeff: float = 0.001
    """Router z-loss coefficient."""

    moc_bank_init_std: float = 0.02
    """Standard deviation of the bank's normal initialisation."""

    moc_bank_seed: int = 1234
    """Seed of the bank's initialisation; every parallel layout draws the same bank from it."""

    reset_attention_mask: bool = False
    """Documents packed into a window are separated (Megatron-LM's ``--reset-attention-mask``): attention is
    block-causal within each document and ``chunk`` routing restarts its running mean at every document start."""

    def __post_init__(self) -> None:
        if self.reset_attention_mask:
            self.apply_rope_fusion = False  # RoPE angles differ per row (positions restart per document)
        if self.moc_memory_layers:
            # Memory layers have parameters the others lack: checkpoint every layer under its own index
            # (decoder.layers.N.*) instead of megatron's stacked [num_layers, ...] tensors.
            self.hetereogenous_dist_checkpoint = True
        if self.moc_memory_layers and self.expert_model_parallel_size > 1 and self.num_moe_experts is None:
            # Routed chapters are megatron's experts: megatron-core allows expert parallelism only with
            # num_moe_experts set. The layer specs build no MoE MLPs from it.
            if self.add_bias_linear and self.tensor_model_parallel_size > 1:
                raise ValueError(
                    "expert-model-parallel-size > 1 with tensor-model-parallel-size > 1 needs "
                    "add_bias_linear=False (megatron-core allows no biases with expert tensor parallelism)"
                )
            self.num_moe_experts = max(self.moc_num_chapters - self.moc_num_shared_chapters, 1)
        megatron_versions.empty_full_cuda_graph_scope(self)  # no CUDA graph is captured from a MoC config
        super().__post_init__()
        if self.moc_num_heads is None:
            self.moc_num_heads = self.num_attention_heads
        if self.moc_num_query_groups is None:
            self.moc_num_query_groups = self.moc_num_heads
        if self.moc_bank_dim is None:
            self.moc_bank_dim = self.hidden_size
        if self.has_memory:
            self._validate_memory()

    @property
    def has_memory(self) -> bool:
        """Whether any layer reads a memory bank."""
        return len(self.moc_memory_layers) > 0

    @property
    def moc_num_routed_chapters(self) -> int:
        """Chapters the router chooses from (``C - S``)."""
        return self.moc_num_chapters - self.moc_num_shared_chapters

    @property
    def moc_bank_tokens(self) -> int:
        """Memory tokens in one bank (``N_m = C * T``)."""
        return self.moc_num_chapters * self.moc_chapter_size

    @property
    def moc_head_dim(self) -> int:
        """Width of one memory attention head."""
        return self.hidden_size // self.moc_num_heads

    def _validate_memory(self) -> None:
        layers = self.moc_memory_layers
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"moc_memory_layers {bad} outside 0..{self.num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"moc_memory_layers has duplicates: {layers}")
        if self.moc_num_shared_chapters < 0 or self.moc_num_routed_chapters < 1:
            raise ValueError(
                f"need at least one routed chapter: moc_num_chapters={self.moc_num_chapters}, "
                f"moc_num_shared_chapters={self.moc_num_shared_chapters}"
            )
        if not 1 <= self.moc_top_k <= self.moc_num_routed_chapters:
            raise ValueError(
                f"moc_top_k={self.moc_top_k} must be in 1..{self.moc_num_routed_chapters} (routed chapters)"
            )
        if self.hidden_size % self.moc_num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by moc_num_heads {self.moc_num_heads}")
        if self.moc_num_heads % self.moc_num_query_groups:
            raise ValueError(
                f"moc_num_heads {self.moc_num_heads} not divisible by moc_num_query_groups "
                f"{self.moc_num_query_groups}"
            )
        tp = self.tensor_model_parallel_size
        if self.moc_num_query_groups % tp:
            raise ValueError(
                f"moc_num_query_groups {self.moc_num_query_groups} not divisible by "
                f"tensor-model-parallel-size {tp}"
            )
        ep = self.expert_model_parallel_size
        if self.moc_num_routed_chapters % ep:
            raise ValueError(
                f"{self.moc_num_routed_chapters} routed chapters (moc_num_chapters - moc_num_shared_chapters) "
                f"do not divide evenly over expert-model-parallel-size {ep}"
            )
        if self.moc_routing_unit not in ("sequence", "document", "chunk", "token"):
            raise ValueError("moc_routing_unit must be sequence, document, chunk or token, "
                             f"not {self.moc_routing_unit!r}")
        if self.moc_gating not in ("paper", "mixture"):
            raise ValueError(f"moc_gating must be paper or mixture, not {self.moc_gating!r}")
        if self.moc_attention_impl not in ("auto", "triton", "blocked", "gather"):
            raise ValueError(
                f"moc_attention_impl must be auto, triton, blocked or gather, not {self.moc_attention_impl!r}"
            )
        if self.moc_routing_unit in ("chunk", "document") and self.moc_chunk_size < 1:
            raise ValueError("moc_chunk_size must be positive")
