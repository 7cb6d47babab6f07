"""Megatron checkpoint <-> Hugging Face MoC: the configuration and the parameter name mapping.

One table (:func:`parameter_plan`) lists every Hugging Face tensor with the Megatron checkpoint key it
comes from and how: ``copy``, or a slice of megatron's fused ``linear_qkv`` (rows grouped per query
group: the group's query heads, then its key head, then its value head) or of ``linear_fc1``
(``[gate; up]``). Export reads the plan forwards, import backwards, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moc_megatron.errors import MoCError

# Megatron norm keys differ between the local layer spec (torch norms) and Transformer Engine's fused
# norm + linear modules; export accepts either, import writes the local spec's (which this project builds).
NORM_KEY_ALTERNATIVES = {
    ".self_attention.linear_qkv.layer_norm_norm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".mlp.linear_fc1.layer_norm_norm.weight": ".mlp.linear_fc1.layer_norm_weight",
    ".pre_cross_attn_layernorm.norm.weight": ".pre_cross_attn_layernorm.weight",
    "decoder.final_layernorm.norm.weight": "decoder.final_layernorm.weight",
    ".self_attention.q_layernorm.norm.weight": ".self_attention.q_layernorm.weight",
    ".self_attention.k_layernorm.norm.weight": ".self_attention.k_layernorm.weight",
}

# megatron-core 0.16.1's Llama 3.x RoPE scaling takes only the factor; the rest is fixed at these values.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_parameters(theta: float, scaling_factor: float | None) -> dict:
    """``rope_parameters`` of ``config.json``: plain RoPE, or Llama 3.x scaling with megatron-core's fixed values."""
    if scaling_factor is None:
        return {"rope_type": "default", "rope_theta": float(theta)}
    return {"rope_type": "llama3", "rope_theta": float(theta), "factor": float(scaling_factor), **LLAMA3_ROPE_FIXED}


class UnsupportedModelError(MoCError, ValueError):
    """The checkpoint's model has a feature the Hugging Face MoC model does not implement."""


@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: where it lives in the Megatron checkpoint."""

    hf_name: str
    megatron_key: str
    part: str = "copy"
    """``copy``, ``rows`` (the first ``shape[0]`` rows: the true vocabulary of a padded embedding or output
    layer), ``q``/``k``/``v`` (slices of linear_qkv) or ``gate``/``up`` (halves of linear_fc1)."""
    shape: tuple[int, ...] = ()
    megatron_rows: int = 0
    """Rows of the Megatron tensor of a ``rows`` entry (the padded vocabulary)."""


# config.json fields of the Hugging Face MoC model -> the MoCConfig field each holds. Export writes them from a
# checkpoint's model record, import reads them back: the one place where both spell these names.
HF_BACKBONE_FIELDS: dict[str, str] = {
    "hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels", "rms_norm_eps": "layernorm_epsilon", "initializer_range": "init_method_std",
    "qkv_bias": "add_qkv_bias", "qk_norm": "qk_layernorm", "reset_attention_mask": "reset_attention_mask",
    "memory_layers": "moc_memory_layers",
}
HF_MEMORY_FIELDS: dict[str, str] = {
    "num_chapters": "moc_num_chapters", "chapter_size": "moc_chapter_size",
    "num_shared_chapters": "moc_num_shared_chapters", "memory_top_k": "moc_top_k",
    "memory_num_heads": "moc_num_heads", "memory_num_kv_heads": "moc_num_query_groups", "bank_dim": "moc_bank_dim",
    "routing_unit": "moc_routing_unit", "chunk_size": "moc_chunk_size", "gating": "moc_gating",
    "routed_scaling_factor": "moc_routed_scaling_factor", "shared_bank": "moc_shared_bank",
    "bank_init_std": "moc_bank_init_std",
}
# What the Hugging Face MoC model always is (config.json has no field for it): the fields a dense or MoC folder
# imports with.
HF_FIXED_FIELDS: dict[str, object] = {
    "normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": "silu", "add_bias_linear": False,
}
_FLOAT_FIELDS = ("layernorm_epsilon", "init_method_std", "moc_routed_scaling_factor", "moc_bank_init_std")


def hf_config_from_model(fields: Mapping[str, Any], settings: Mapping[str, Any]) -> dict:
    """``config.json`` fields of the Hugging Face model for a checkpoint's model record (``MoCConfig`` fields
    and ``ModelSettings`` values).

    Raises :class:`UnsupportedModelError` for a backbone the HF model does not implement.
    """
    problems = []
    if fields.get("normalization") != "RMSNorm":
        problems.append(f"normalization {fields.get('normalization')!r} (only RMSNorm)")
    if not fields.get("gated_linear_unit") or fields.get("activation_func") != "silu":
        problems.append("an MLP that is not SwiGLU (--swiglu)")
    if fields.get("add_bias_linear"):
        problems.append("linear biases (give --disable-bias-linear)")
    if problems:
        raise UnsupportedModelError("the Hugging Face MoC model does not support " + "; ".join(problems))
    heads = fields["num_attention_heads"]
    config = {hf: fields.get(name) for hf, name in HF_BACKBONE_FIELDS.items()}
    config.update(
        vocab_size=settings["vocab_size"],
        num_key_value_heads=config["num_key_value_heads"] or heads,
        head_dim=config["head_dim"] or fields["hidden_size"] // heads,
        max_position_embeddings=settings["max_sequence_length"],
        rms_norm_eps=fields.get("layernorm_epsilon", 1e-5),
        rope_parameters=rope_parameters(settings["rotary_base"], settings.get("rope_scaling_factor")
                                        if settings.get("rope_scaling") else None),
        initializer_range=fields.get("init_method_std", 0.02),
        tie_word_embeddings=bool(settings["tie_embeddings"]),
        qkv_bias=bool(config["qkv_bias"]),
        qk_norm=bool(config["qk_norm"]),
        reset_attention_mask=bool(config["reset_attention_mask"]),
        memory_layers=sorted(config["memory_layers"] or []),
    )
    if config["memory_layers"]:
        config.update({hf: fields[name] for hf, name in HF_MEMORY_FIELDS.items() if name != "moc_bank_init_std"})
        config.update(shared_bank=bool(config["shared_bank"]), bank_init_std=fields.get("moc_bank_init_std") or 0.02)
    return config


def model_fields_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MoCConfig`` fields of a Hugging Face MoC ``config.json`` (memory fields only when it has memory layers)."""
    fields: dict[str, Any] = dict(HF_FIXED_FIELDS)
    fields.update({name: config[hf] for hf, name in HF_BACKBONE_FIELDS.items() if hf in config})
    if config.get("memory_layers"):
        fields.update({name: config[hf] for hf, name in HF_MEMORY_FIELDS.items() if hf in config})
    for name in _FLOAT_FIELDS:
        if fields.get(name) is not None:
            fields[name] = float(fields[name])
    fields["moc_memory_layers"] = list(fields.get("moc_memory_layers") or [])
    return fields


def _vocab_entry(hf_name: str, key: str, vocab: int, padded: int | None, h: int) -> Entry:
    if padded is None or padded == vocab:
        return Entry(hf_name, key, shape=(vocab, h))
    if padded < vocab:
        raise UnsupportedModelError(f"the vocabulary ({vocab} tokens) is larger than the model's {padded} rows")
    return Entry(hf_name, key, "rows", (vocab, h), padded)


def parameter_plan(config: dict, padded_vocab: int | None = None) -> list[Entry]:
    """Every tensor of the Hugging Face model (``config``: ``config.json`` fields), in file order.

    ``padded_vocab``: rows of Megatron's embedding and output layer when they are padded beyond the
    ``config["vocab_size"]`` rows of the Hugging Face model (export drops the padding, import adds zero rows).
    """
    h, ffn = config["hidden_size"], config["intermediate_size"]
    heads, groups, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    memory = config.get("memory_layers") or []
    vocab = config["vocab_size"]
    plan = [_vocab_entry("model.embed_tokens.weight", "embedding.word_embeddings.weight", vocab, padded_vocab, h)]
    for i in range(config["num_hidden_layers"]):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = mg + "self_attention.linear_qkv.weight"
        plan += [
            Entry(hf + "input_layernorm.weight", mg + "self_attention.linear_qkv.layer_norm_norm.weight", shape=(h,)),
            Entry(hf + "self_attn.q_proj.weight", qkv, "q", (heads * hd, h)),
            Entry(hf + "self_attn.k_proj.weight", qkv, "k", (groups * hd, h)),
            Entry(hf + "self_attn.v_proj.weight", qkv, "v", (groups * hd, h)),
        ]
        if config.get("qkv_bias"):
            bias = mg + "self_attention.linear_qkv.bias"
            plan += [Entry(hf + f"self_attn.{p}_proj.bias", bias, p, (n * hd,))
                     for p, n in (("q", heads), ("k", groups), ("v", groups))]
        if config.get("qk_norm"):
            plan += [Entry(hf + f"self_attn.{p}_norm.weight", mg + f"self_attention.{p}_layernorm.norm.weight",
                           shape=(hd,)) for p in ("q", "k")]
        plan.append(Entry(hf + "self_attn.o_proj.weight", mg + "self_attention.linear_proj.weight",
                          shape=(h, heads * hd)))
        if i in memory:
            plan += _memory_plan(config, hf, mg)
        fc1 = mg + "mlp.linear_fc1.weight"
        plan += [
            Entry(hf + "post_attention_layernorm.weight", mg + "mlp.linear_fc1.layer_norm_norm.weight", shape=(h,)),
            Entry(hf + "mlp.gate_proj.weight", fc1, "gate", (ffn, h)),
            Entry(hf + "mlp.up_proj.weight", fc1, "up", (ffn, h)),
            Entry(hf + "mlp.down_proj.weight", mg + "mlp.linear_fc2.weight", shape=(h, ffn)),
        ]
    plan.append(Entry("model.norm.weight", "decoder.final_layernorm.norm.weight", shape=(h,)))
    if memory and config.get("shared_bank", True):
        plan += _bank_plan(config, "model.memory_bank.", "memory_bank.")
    if not config["tie_word_embeddings"]:
        plan.append(_vocab_entry("lm_head.weight", "output_layer.weight", vocab, padded_vocab, h))
    return plan


def _memory_plan(config: dict, hf: str, mg: str) -> list[Entry]:
    h, d = config["hidden_size"], config["bank_dim"]
    mem_heads, mem_groups = config["memory_num_heads"], config["memory_num_kv_heads"]
    e = h // mem_heads
    routed = config["num_chapters"] - config["num_shared_chapters"]
    ca, mh = mg + "cross_attention.", hf + "memory."
    plan = [
        Entry(hf + "memory_layernorm.weight", mg + "pre_cross_attn_layernorm.norm.weight", shape=(h,)),
        Entry(mh + "q_proj.weight", ca + "linear_q.weight", shape=(mem_heads * e, h)),
        Entry(mh + "k_proj.weight", ca + "linear_k.weight", shape=(mem_groups * e, d)),
        Entry(mh + "v_proj.weight", ca + "linear_v.weight", shape=(mem_groups * e, d)),
        Entry(mh + "o_proj.weight", ca + "linear_o.weight", shape=(h, mem_heads * e)),
        Entry(mh + "shared_norm.weight", ca + "shared_norm.weight", shape=(d,)),
        Entry(mh + "routed_norm.weight", ca + "routed_norm.weight", shape=(d,)),
        Entry(mh + "router.weight", ca + "router.weight", shape=(routed, h)),
        Entry(mh + "router.bias", ca + "router.bias", shape=(routed,)),
    ]
    if not config.get("shared_bank", True):
        plan += _bank_plan(config, mh + "bank.", ca + "own_bank.")
    return plan


def _bank_plan(config: dict, hf: str, mg: str) -> list[Entry]:
    t, d = config["chapter_size"], config["bank_dim"]
    shared = config["num_shared_chapters"]
    return [
        Entry(hf + "shared", mg + "shared", shape=(shared, t, d)),
        Entry(hf + "routed", mg + "routed", shape=(config["num_chapters"] - shared, t, d)),
    ]


def megatron_shape(entries: list[Entry]) -> tuple[int, ...]:
    """Global shape of the Megatron tensor that ``entries`` (all of one key) come from."""
    if entries[0].part == "copy":
        return entries[0].shape
    if entries[0].part == "rows":
        return (entries[0].megatron_rows, *entries[0].shape[1:])
    rows = sum(e.shape[0] for e in entries)
    return (rows, *entries[0].shape[1:])


def split(tensor: torch.Tensor, entries: list[Entry], config: dict) -> list[torch.Tensor]:
    """The Hugging Face tensors of ``entries`` cut from their Megatron tensor."""
    part = entries[0].part
    if part == "copy":
        return [tensor]
    if part == "rows":
        return [tensor[: entries[0].shape[0]].contiguous()]
    if part in ("gate", "up"):
        gate, up = tensor.chunk(2, dim=0)
        return [gate if e.part == "gate" else up for e in entries]
    heads, groups, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per = heads // groups
    rest = tuple(tensor.shape[1:])  # (hidden,) of the weight, () of the bias
    grouped = tensor.view(groups, per + 2, hd, *rest)
    parts = {
        "q": grouped[:, :per].reshape(heads * hd, *rest),
        "k": grouped[:, per].reshape(groups * hd, *rest),
        "v": grouped[:, per + 1].reshape(groups * hd, *rest),
    }
    return [parts[e.part].contiguous() for e in entries]


def fuse(tensors: dict[str, torch.Tensor], entries: list[Entry], config: dict) -> torch.Tensor:
    """Inverse of :func:`split`: the Megatron tensor from the Hugging Face tensors of ``entries``."""
    part = entries[0].part
    by_part = {e.part: tensors[e.hf_name] for e in entries}
    if part == "copy":
        return by_part["copy"]
    if part == "rows":  # Megatron's padded vocabulary rows are zero
        value = by_part["rows"]
        padded = value.new_zeros(entries[0].megatron_rows, *value.shape[1:])
        padded[: value.shape[0]] = value
        return padded
    if part in ("gate", "up"):
        return torch.cat([by_part["gate"], by_part["up"]], dim=0)
    heads, groups, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per = heads // groups
    rest = tuple(by_part["q"].shape[1:])
    q = by_part["q"].view(groups, per, hd, *rest)
    k = by_part["k"].view(groups, 1, hd, *rest)
    v = by_part["v"].view(groups, 1, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * hd, *rest)


def group_by_key(plan: list[Entry]) -> list[tuple[str, list[Entry]]]:
    """The plan as ``(megatron_key, entries)`` in order of first appearance."""
    groups: dict[str, list[Entry]] = {}
    for entry in plan:
        groups.setdefault(entry.megatron_key, []).append(entry)
    return list(groups.items())
