"""The model signature: the values a checkpoint and the run loading it must agree on.

Stored under ``"model_signature"`` in every checkpoint's common state; a run whose model differs is
refused with one line per disagreeing setting, named by its flag.
"""

from __future__ import annotations

from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings

# MoCConfig fields that fix the model's parameters or its computation: a checkpoint and the run
# loading it must agree on all of them.
SIGNATURE_CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "gated_linear_unit", "add_bias_linear", "qk_layernorm",
    "moc_memory_layers", "moc_num_chapters", "moc_chapter_size", "moc_num_shared_chapters", "moc_top_k",
    "moc_num_heads", "moc_num_query_groups", "moc_bank_dim", "moc_routing_unit", "moc_chunk_size",
    "moc_gating", "moc_routed_scaling_factor", "moc_shared_bank",
)
SIGNATURE_SETTINGS_FIELDS = ("vocab_size", "tie_embeddings", "rotary_base")

# Signature entries whose flag is not simply "--" + name with dashes.
_FLAG_OF = {
    "gated_linear_unit": "--swiglu",
    "activation_func": "--swiglu",
    "add_bias_linear": "--disable-bias-linear",
    "vocab_size": "vocabulary: the tokenizer or --vocab-size, padded to --make-vocab-size-divisible-by x TP",
    "tie_embeddings": "--untie-embeddings-and-output-weights",
    "rope_scaling": "--use-rope-scaling",
}


def model_signature(config: MoCConfig, settings: ModelSettings) -> dict:
    """The values a checkpoint and the run loading it must agree on."""
    sig = {name: getattr(config, name) for name in SIGNATURE_CONFIG_FIELDS}
    sig["moc_memory_layers"] = sorted(sig["moc_memory_layers"])
    sig["activation_func"] = getattr(config.activation_func, "__name__", str(config.activation_func))
    sig.update({name: getattr(settings, name) for name in SIGNATURE_SETTINGS_FIELDS})
    # Recorded only when on: signatures of checkpoints saved before these flags existed stay the same.
    if config.add_qkv_bias:
        sig["add_qkv_bias"] = True
    if config.reset_attention_mask:
        sig["reset_attention_mask"] = True
    if settings.rope_scaling:
        sig.update(rope_scaling=True, rope_scaling_factor=settings.rope_scaling_factor)
    return sig


def signature_mismatches(saved: dict, current: dict) -> list[str]:
    """One line per disagreeing entry: ``--flag: checkpoint X, this run Y``."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            flag = _FLAG_OF.get(name, "--" + name.replace("_", "-"))
            lines.append(f"  {flag} ({name}): checkpoint {saved.get(name)!r}, this run {current.get(name)!r}")
    return lines
