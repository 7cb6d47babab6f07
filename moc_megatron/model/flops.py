"""FLOP rules of MoC models (the parameter and preset report is :mod:`moc_megatron.model.model_report`).

FLOPs follow the counting rules of the paper's Appendix A.2 ("Analytic FLOPs calculation", which mirrors
``scripts/estimate_flops.py`` of the paper's code), per sequence:

- linear layer ``2 N d_in d_out``; attention matmuls ``QK^T`` and ``AV`` ``4 L_q L_k (h e)``;
  softmax, mask and scale ``(5 + 2)`` per attention score (``h L_q L_k`` scores);
- RMSNorm ``N (4 d + 4)``; RoPE ``3 L (d_q + d_kv)``; SwiGLU activation ``5 L d_ff``; residual add ``L d``;
- router: mean pooling ``d (L - 1) + d``, linear, softmax ``5`` and top-k ``ceil(log2 k)`` per logit;
  router losses (see :func:`router_loss_flops`);
- memory: weighting of the selected memory tokens ``N_sel d`` and their RMSNorm, projections of the
  memory tokens to K and V, attention of every query over its ``N_sel = (S + k) T`` selected tokens;
- final RMSNorm, LM head ``2 L d V`` and cross-entropy ``5 (L - 1) V``;
- backward = 2 x forward (so forward+backward = 3 x forward). No recomputation, no optimizer.

Two conventions for the router differ from the paper's code in a few thousand FLOPs per layer: our
router scores the ``C - S`` routed chapters (the paper's scores all ``C`` and masks the shared ones) and
computes the load-balancing and z-losses only (the paper's code also computes an MSE auxiliary loss and
the router entropy). ``paper_convention=True`` counts the router as the paper's code does, which
reproduces the appendix's totals exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moc_megatron.config import MoCConfig

SOFTMAX_FLOPS = 5
"""FLOPs per element of a softmax (the paper's ``SOFTMAX_FLOPS_PER_SCORE``)."""
MASK_SCALE_FLOPS = 2
"""FLOPs per attention score for masking and scaling."""
ACTIVATION_FLOPS = {"silu": 4, "gelu": 8, "relu": 1, "sigmoid": 4, "tanh": 4}
"""FLOPs per element of an MLP activation; a gated (GLU) MLP adds one multiply."""

COMPONENTS = (
    "self_attention", "rope", "mlp", "norms", "residuals", "router", "router_losses",
    "memory_preprocess", "memory_attention", "lm_head", "loss",
)
"""Forward-FLOP components, in the order of the paper's estimator breakdown."""


# ----------------------------------------------------------------------------------------------------------
# Counting rules
# ----------------------------------------------------------------------------------------------------------


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A bias-free linear layer applied to ``tokens`` vectors: ``2 N d_in d_out``."""
    return 2 * tokens * d_in * d_out


def attention_matmul_flops(q_len: int, k_len: int, width: int) -> int:
    """``QK^T`` and ``AV`` over all heads (``width = heads * head_dim``): ``4 L_q L_k width``."""
    return 4 * q_len * k_len * width


def attention_softmax_flops(heads: int, q_len: int, k_len: int) -> int:
    """Softmax, masking and scaling of ``heads * L_q * L_k`` attention scores."""
    return heads * q_len * k_len * (SOFTMAX_FLOPS + MASK_SCALE_FLOPS)


def rmsnorm_flops(vectors: int, dim: int) -> int:
    """RMSNorm of ``vectors`` vectors of width ``dim``: ``N (4 d + 4)``."""
    return vectors * (4 * dim + 4)


def mlp_activation_flops(tokens: int, ffn: int, activation: str, gated: bool) -> int:
    """The MLP's elementwise activation (SwiGLU: ``5 L d_ff``)."""
    per_element = ACTIVATION_FLOPS.get(activation, ACTIVATION_FLOPS["gelu"]) + (1 if gated else 0)
    return tokens * ffn * per_element


def routing_units(config: MoCConfig, seq_length: int, documents: float = 1.0) -> float:
    """Routing units (routes) per sequence: 1 (sequence), ``documents`` (the documents packed into a sequence,
    ``document``), one per chunk, or one per token. With documents separated (``reset_attention_mask``) a
    document's last chunk is partial: ``documents - 1`` chunks more than an unseparated sequence, on average."""
    unit = config.moc_routing_unit
    if unit == "sequence":
        return 1
    if unit == "document":
        return documents
    if unit == "chunk":
        chunks = -(-seq_length // config.moc_chunk_size)
        return chunks + (documents - 1 if config.reset_attention_mask else 0)
    return seq_length


def read_units(config: MoCConfig, seq_length: int, documents: float = 1.0) -> float:
    """Units the memory read runs over per sequence: ``document`` routing reads a document in pieces of
    ``moc_chunk_size`` tokens (about ``L / chunk + documents - 1`` of them); every other unit is read whole."""
    if config.moc_routing_unit != "document":
        return routing_units(config, seq_length, documents)
    return -(-seq_length // config.moc_chunk_size) + documents - 1


def router_loss_flops(units: int, chapters: int, top_k: int, paper_convention: bool = False) -> int:
    """Router auxiliary losses for ``units`` routing units over ``chapters`` router outputs.

    Ours (megatron-core's switch load balancing and z-loss): chapter counts ``n k``, summed probabilities
    ``C (n - 1)``, their dot product with the counts and scale ``2 C``; z-loss: log-sum-exp ``5 n C``,
    square and mean ``2 n``. With ``paper_convention`` the paper code's count (its
    ``router_aux_loss_flops``: one-hot load counts, load balance, MSE auxiliary loss, z-loss and the router
    entropy), 331,859 FLOPs per memory layer at paper size.
    """
    n, c, k = units, chapters, max(top_k, 1)
    if not paper_convention:
        return n * k + c * (n - 1) + 2 * c + SOFTMAX_FLOPS * n * c + 2 * n
    f_ops = n * c * (k - 1) + c * (n - 1) + c
    p_ops = c * (n - 1) + c
    load_balance = c + (c - 1) + 1
    p_squared = n * c + c * (n - 1) + c
    mse = c + c + (c - 1) + 1
    z_loss = SOFTMAX_FLOPS * n * c + n + (n - 1) + 1
    entropy = 4 * n * c
    return f_ops + p_ops + load_balance + p_squared + mse + z_loss + entropy


# ----------------------------------------------------------------------------------------------------------
# Per-layer counts
# ----------------------------------------------------------------------------------------------------------


def _activation_name(config: MoCConfig) -> str:
    return getattr(config.activation_func, "__name__", "gelu")


def standard_layer_flops(config: MoCConfig, seq_length: int) -> dict[str, int]:
    """Forward FLOPs of one ordinary decoder layer (self-attention, MLP, two norms, two residuals)."""
    L, d = seq_length, config.hidden_size
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels or d // heads
    q_width, kv_width = heads * head_dim, groups * head_dim
    attention = (
        linear_flops(L, d, q_width) + 2 * linear_flops(L, d, kv_width) + linear_flops(L, q_width, d)
        + attention_matmul_flops(L, L, q_width) + attention_softmax_flops(heads, L, L)
    )
    ffn = config.ffn_hidden_size
    gated = config.gated_linear_unit
    mlp = (3 if gated else 2) * linear_flops(L, d, ffn) + mlp_activation_flops(L, ffn, _activation_name(config), gated)
    return {
        "self_attention": attention,
        "rope": 3 * L * (q_width + kv_width),
        "mlp": mlp,
        "norms": 2 * rmsnorm_flops(L, d),
        "residuals": 2 * L * d,
    }


def memory_tokens_selected(config: MoCConfig) -> int:
    """Memory tokens each query attends to: ``N_sel = (S + k) T``."""
    return (config.moc_num_shared_chapters + config.moc_top_k) * config.moc_chapter_size


def memory_tokens_projected(config: MoCConfig, seq_length: int, micro_batch_size: int = 1,
                            documents: float = 1.0) -> int:
    """Memory tokens normalised and projected to K/V per sequence.

    Our memory layer projects every chapter with traffic once per micro-batch of ``micro_batch_size``
    sequences: the shared chapters plus at most ``min(C - S, b * units * k)`` routed ones (exact for sequence
    routing at ``b = 1``, an upper bound otherwise: units may pick the same chapters), shared out over the
    micro-batch's sequences.
    """
    b = max(1, micro_batch_size)
    routed = min(config.moc_num_routed_chapters, b * routing_units(config, seq_length, documents) * config.moc_top_k)
    return round((config.moc_num_shared_chapters + routed) * config.moc_chapter_size / b)


def memory_layer_extra_flops(config: MoCConfig, seq_length: int, paper_convention: bool = False,
                             micro_batch_size: int = 1, documents: float = 1.0) -> dict[str, int]:
    """Forward FLOPs a memory layer adds to an ordinary one: router, memory read, norm, residual.

    ``micro_batch_size``: sequences per micro-batch (chapters are projected once per micro-batch);
    ``documents``: documents packed into one sequence (``document`` routing, chunks restarting per document).
    """
    L, d = seq_length, config.hidden_size
    n = routing_units(config, L, documents)
    outputs = config.moc_num_chapters if paper_convention else config.moc_num_routed_chapters
    unit = config.moc_routing_unit
    if unit in ("sequence", "document"):
        pooling = d * (L - 1) + n * d
    elif unit == "chunk":
        pooling = d * (L - 1) + n * d  # prefix sums, then one division per chunk
    else:
        pooling = 0
    top_k = config.moc_top_k
    router = round(
        pooling + linear_flops(n, d, outputs) + SOFTMAX_FLOPS * n * outputs
        + n * outputs * max(1, math.ceil(math.log2(max(top_k, 1))))
    )

    d_bank = config.moc_bank_dim
    heads, groups, head_dim = config.moc_num_heads, config.moc_num_query_groups, config.moc_head_dim
    q_width, kv_width = heads * head_dim, groups * head_dim
    n_sel = memory_tokens_selected(config)
    n_kv = memory_tokens_projected(config, L, micro_batch_size, documents)
    if config.moc_gating == "paper":
        # each read unit's selected memory tokens times their chapter weight
        weighting = round(read_units(config, L, documents) * n_sel * d_bank)
    else:
        weighting = heads * L * n_sel  # mixture: each chapter's attention probabilities times its weight
    preprocess = weighting + rmsnorm_flops(n_kv, d_bank)  # shared and routed RMSNorms
    attention = (
        linear_flops(L, d, q_width) + 2 * linear_flops(n_kv, d_bank, kv_width) + linear_flops(L, q_width, d)
        + attention_matmul_flops(L, n_sel, q_width) + attention_softmax_flops(heads, L, n_sel)
    )
    return {
        "router": router,
        "router_losses": round(router_loss_flops(n, outputs, top_k, paper_convention)),
        "memory_preprocess": preprocess,
        "memory_attention": attention,
        "norms": rmsnorm_flops(L, d),
        "residuals": L * d,
    }


def head_flops(config: MoCConfig, vocab_size: int, seq_length: int) -> dict[str, int]:
    """Final RMSNorm, LM head and cross-entropy over the ``L - 1`` predicted positions."""
    L, d = seq_length, config.hidden_size
    return {
        "norms": rmsnorm_flops(L, d),
        "lm_head": linear_flops(L, d, vocab_size),
        "loss": SOFTMAX_FLOPS * (L - 1) * vocab_size,
    }


# ----------------------------------------------------------------------------------------------------------
# Model totals
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    """Forward FLOPs of one sequence by component; backward is counted as twice the forward."""

    seq_length: int
    components: dict[str, int]
    """Forward FLOPs per component (:data:`COMPONENTS`), summed over layers."""
    layers: list[int]
    """Forward FLOPs of each decoder layer, memory read included."""
    head: int
    """Forward FLOPs of the final norm, LM head and loss."""
    paper_convention: bool = False

    @property
    def forward(self) -> int:
        """Forward FLOPs per sequence."""
        return sum(self.components.values())

    @property
    def backward(self) -> int:
        """Backward FLOPs per sequence (2 x forward, the paper's rule)."""
        return 2 * self.forward

    @property
    def forward_backward(self) -> int:
        """Forward plus backward FLOPs per sequence (3 x forward)."""
        return self.forward + self.backward


def estimate_flops(config: MoCConfig, vocab_size: int, seq_length: int, paper_convention: bool = False,
                   micro_batch_size: int = 1, documents: float = 1.0) -> FlopCount:
    """FLOPs of one sequence of ``seq_length`` tokens through the model ``config`` describes, trained in
    micro-batches of ``micro_batch_size`` sequences that pack ``documents`` documents each (on average)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, not {seq_length}")
    components = dict.fromkeys(COMPONENTS, 0)
    layers = []
    memory = set(config.moc_memory_layers)
    for index in range(config.num_layers):
        parts = standard_layer_flops(config, seq_length)
        if index in memory:
            extra = memory_layer_extra_flops(config, seq_length, paper_convention, micro_batch_size, documents)
            for name, value in extra.items():
                parts[name] = parts.get(name, 0) + value
        for name, value in parts.items():
            components[name] += value
        layers.append(sum(parts.values()))
    head = head_flops(config, vocab_size, seq_length)
    for name, value in head.items():
        components[name] += value
    return FlopCount(seq_length, components, layers, sum(head.values()), paper_convention)
