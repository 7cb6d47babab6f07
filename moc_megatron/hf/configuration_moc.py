"""Hugging Face configuration of a Mixture-of-Chapters (MoC) causal language model.

Self-contained (imports transformers only): an exported folder carries this file next to
``modeling_moc.py`` and loads with ``AutoConfig.from_pretrained(dir, trust_remote_code=True)``.
Backbone field names follow ``LlamaConfig``; the memory fields mirror the Megatron ``moc_*`` flags.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoCConfig(PretrainedConfig):
    """A decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU) whose ``memory_layers`` read a chapter bank.

    Backbone options: ``qkv_bias`` (biases on the query/key/value projections, Qwen2's; Megatron's
    ``--add-qkv-bias``), ``qk_norm`` (RMSNorm of each query and key head before RoPE, Qwen3's; ``--qk-layernorm``),
    ``rope_parameters`` ``{"rope_type": "default" | "llama3", "rope_theta", ...}`` (Llama 3.x scaling:
    ``--use-rope-scaling --rope-scaling-factor``).

    Memory fields (Megatron flag in brackets): ``memory_layers`` (``--moc-memory-layers``, 0-based),
    ``num_chapters`` ``C``, ``chapter_size`` ``T``, ``num_shared_chapters`` ``S``, ``memory_top_k``,
    ``memory_num_heads``, ``memory_num_kv_heads``, ``bank_dim``, ``routing_unit``
    (``document``/``sequence``/``chunk``/``token``), ``chunk_size``, ``gating`` (``paper``/``mixture``),
    ``routed_scaling_factor``, ``shared_bank``. ``padding_id_without_mask``: when the model is called without
    an attention mask, a trailing run of this id is right padding (``None``: no such inference).

    Documents: ``document_separator_id`` is the token that ends a document (Megatron's end-of-document token);
    in ``input_ids`` the token after it starts a new document. ``document`` routing routes each document;
    ``reset_attention_mask`` (``--reset-attention-mask``) also separates documents in attention (block-causal,
    positions counted from each document's start) and restarts ``chunk`` routing at every document start.
    """

    model_type = "moc"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2304,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        use_cache: bool = True,
        memory_layers: list[int] | None = None,
        num_chapters: int = 2,
        chapter_size: int = 64,
        num_shared_chapters: int = 1,
        memory_top_k: int = 1,
        memory_num_heads: int | None = None,
        memory_num_kv_heads: int | None = None,
        bank_dim: int | None = None,
        routing_unit: str = "sequence",
        chunk_size: int = 64,
        gating: str = "paper",
        routed_scaling_factor: float = 2.5,
        shared_bank: bool = True,
        bank_init_std: float = 0.02,
        padding_id_without_mask: int | None = None,
        document_separator_id: int | None = None,
        reset_attention_mask: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.initializer_range = initializer_range
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.use_cache = use_cache
        self.memory_layers = sorted(memory_layers or [])
        self.num_chapters = num_chapters
        self.chapter_size = chapter_size
        self.num_shared_chapters = num_shared_chapters
        self.memory_top_k = memory_top_k
        self.memory_num_heads = memory_num_heads or num_attention_heads
        self.memory_num_kv_heads = memory_num_kv_heads or self.memory_num_heads
        self.bank_dim = bank_dim or hidden_size
        self.routing_unit = routing_unit
        self.chunk_size = chunk_size
        self.gating = gating
        self.routed_scaling_factor = routed_scaling_factor
        self.shared_bank = shared_bank
        self.bank_init_std = bank_init_std
        self.tie_word_embeddings = tie_word_embeddings
        self.padding_id_without_mask = padding_id_without_mask
        self.document_separator_id = document_separator_id
        self.reset_attention_mask = reset_attention_mask
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_memory()
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_parameters rope_type {rope_type!r} not supported (default or llama3)")

    @property
    def num_routed_chapters(self) -> int:
        """Chapters the router chooses from (``C - S``)."""
        return self.num_chapters - self.num_shared_chapters

    @property
    def memory_head_dim(self) -> int:
        """Width of one memory attention head."""
        return self.hidden_size // self.memory_num_heads

    def _validate_memory(self) -> None:
        if not self.memory_layers:
            return
        bad = [i for i in self.memory_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"memory_layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.num_routed_chapters < 1 or not 1 <= self.memory_top_k <= self.num_routed_chapters:
            raise ValueError(f"need 1 <= memory_top_k ({self.memory_top_k}) <= routed chapters "
                             f"({self.num_routed_chapters})")
        if self.routing_unit not in ("sequence", "document", "chunk", "token"):
            raise ValueError(f"routing_unit must be sequence, document, chunk or token, not {self.routing_unit!r}")
        if self.gating not in ("paper", "mixture"):
            raise ValueError(f"gating must be paper or mixture, not {self.gating!r}")
        if self.memory_num_heads % self.memory_num_kv_heads or self.hidden_size % self.memory_num_heads:
            raise ValueError("memory_num_heads must divide hidden_size and be a multiple of memory_num_kv_heads")
