"""The model part of a run as data: the flag -> ``MoCConfig`` field table, and what checkpoints store of the model.

Every checkpoint stores its model under ``"model_config"`` as plain values: ``{"config": {MoCConfig field:
value}, "settings": {ModelSettings field: value}}``. Tools rebuild the model from that record
(:func:`build_model_config`) without a command line. Checkpoints saved before the record existed hold only
the saving run's flags (``"args"``) and the model signature; :func:`read_model_record` turns those into the
same record through the same table the command line goes through (:func:`model_fields_from_flags`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from moc_megatron import platform
from moc_megatron.checkpoint.signature import SIGNATURE_CONFIG_FIELDS, SIGNATURE_SETTINGS_FIELDS
from moc_megatron.config import MoCConfig
from moc_megatron.config_flags import moc_config_kwargs, moc_fields
from moc_megatron.errors import MoCError
from moc_megatron.model.builder import ModelSettings

MODEL_CONFIG_KEY = "model_config"

# Flags (argument names) that set a TransformerConfig field of the model itself, and that field.
MODEL_FLAGS: dict[str, str] = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "normalization": "normalization", "norm_epsilon": "layernorm_epsilon",
    "add_bias_linear": "add_bias_linear", "qk_layernorm": "qk_layernorm", "add_qkv_bias": "add_qkv_bias",
    "init_method_std": "init_method_std", "attention_dropout": "attention_dropout",
    "hidden_dropout": "hidden_dropout", "reset_attention_mask": "reset_attention_mask",
}
# Flags that set how this run computes the model (layout, precision, recomputation): not stored with it.
RUNTIME_FLAGS: dict[str, str] = {
    "tensor_model_parallel_size": "tensor_model_parallel_size",
    "pipeline_model_parallel_size": "pipeline_model_parallel_size",
    "expert_model_parallel_size": "expert_model_parallel_size",
    "virtual_pipeline_model_parallel_size": "virtual_pipeline_model_parallel_size",
    "sequence_parallel": "sequence_parallel", "bf16": "bf16", "recompute_granularity": "recompute_granularity",
    "recompute_method": "recompute_method", "recompute_num_layers": "recompute_num_layers",
}
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}
"""The MLP activations a model record names (``--swiglu`` selects SiLU; megatron-core's default is GeLU)."""

# megatron's TransformerConfig warnings that do not apply to a MoC model: under EP, MoCConfig sets
# num_moe_experts (megatron's expert-parallel groups need it) but the model has no MoE MLP or MoE router;
# "full scope" is the default cuda_graph_scope, and no CUDA graph is captured.
_INAPPLICABLE_CONFIG_WARNINGS = (
    r"moe_ffn_hidden_size is not set",
    r"Using a large number of experts .* without fp32 routing",
    r"full scope is deprecated",
)


class ModelRecordError(MoCError, ValueError):
    """A checkpoint without a model record or the flags to rebuild one."""


def model_fields_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The model's ``MoCConfig`` fields that the flags (argument name -> value) describe.

    Flags that are absent (a checkpoint saved before they existed) or unset ``--moc-*`` flags are left out,
    so the field keeps ``MoCConfig``'s default. ``--moc-bank-seed`` defaults to ``--seed``.
    """
    fields = {field: flags[flag] for flag, field in MODEL_FLAGS.items() if flag in flags}
    fields.update(moc_config_kwargs(flags))
    if fields.get("moc_bank_seed") is None and flags.get("seed") is not None:
        fields["moc_bank_seed"] = flags["seed"]
    if flags.get("swiglu"):
        fields.update(gated_linear_unit=True, activation_func="silu")
    return fields


def runtime_fields_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of the run's layout, precision and recomputation that the flags set."""
    return {field: flags[flag] for flag, field in RUNTIME_FLAGS.items() if flag in flags}


def build_model_config(model: Mapping[str, Any], runtime: Mapping[str, Any] | None = None,
                       use_cpu_initialization: bool = False) -> MoCConfig:
    """``MoCConfig`` of a model's fields and a run's ``runtime`` fields (default: one process, fp32).

    ``model["activation_func"]`` is a name of :data:`ACTIVATIONS`. The platform's overrides apply, and the
    settings every run of this project uses (as Megatron-LM's ``core_transformer_config_from_args``).
    """
    kwargs = {**model, **(runtime or {})}
    activation = kwargs.pop("activation_func", "gelu")
    if activation not in ACTIVATIONS:
        raise ModelRecordError(f"unknown MLP activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    dtype = torch.bfloat16 if kwargs.get("bf16") else torch.float32
    kwargs.update(
        activation_func=ACTIVATIONS[activation],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Pipeline outputs already sent downstream are freed to their grad_fn, as in Megatron-LM.
        deallocate_pipeline_outputs=True,
        # Unbatched isend/irecv: megatron's batched p2p ops, issued in one fixed order, pair an activation
        # with a gradient when the previous and next stage are the same rank (PP=2, interleaved) on gloo.
        # The unbatched path orders them by rank parity (and what Megatron-LM uses with overlapped p2p).
        batch_p2p_comm=False,
        use_cpu_initialization=platform.weights_on_cpu(use_cpu_initialization),
    )
    if activation == "silu":
        kwargs["bias_activation_fusion"] = False
    kwargs.update(platform.transformer_config_overrides())
    with warnings.catch_warnings():
        for message in _INAPPLICABLE_CONFIG_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return MoCConfig(**kwargs)


def _model_field_names() -> list[str]:
    return [*MODEL_FLAGS.values(), "gated_linear_unit", *(f.name for f in moc_fields())]


def model_record(config: MoCConfig, settings: ModelSettings) -> dict[str, Any]:
    """What a checkpoint stores of its model (plain values; :func:`build_model_config` rebuilds it)."""
    fields = {name: getattr(config, name) for name in _model_field_names()}
    fields["moc_memory_layers"] = list(fields["moc_memory_layers"])
    fields["activation_func"] = config.activation_func.__name__
    return {"config": fields, "settings": dataclasses.asdict(settings)}


def model_record_from_flags(flags: Mapping[str, Any], signature: Mapping[str, Any]) -> dict[str, Any]:
    """The model record of a checkpoint saved before records existed: from its flags and model signature."""
    settings = ModelSettings(
        vocab_size=signature["vocab_size"], max_sequence_length=flags["max_position_embeddings"],
        tie_embeddings=signature["tie_embeddings"], rotary_base=signature["rotary_base"],
        rope_scaling=bool(signature.get("rope_scaling")), rope_scaling_factor=signature.get("rope_scaling_factor", 8.0))
    return {"config": model_fields_from_flags(flags), "settings": dataclasses.asdict(settings)}


def read_model_record(common: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model record of a checkpoint's common state (``where`` names the checkpoint in errors).

    The model signature, which every load is checked against, has the last word on the values it holds.
    """
    if MODEL_CONFIG_KEY in common:
        record = {"config": dict(common[MODEL_CONFIG_KEY]["config"]),
                  "settings": dict(common[MODEL_CONFIG_KEY]["settings"])}
    elif "args" in common and "model_signature" in common:
        record = model_record_from_flags(common["args"], common["model_signature"])
    else:
        raise ModelRecordError(f"{where}: no model_config or saved arguments/model signature "
                               "(not a pretrain_moc.py checkpoint)")
    signature = common.get("model_signature") or {}
    for name in (*SIGNATURE_CONFIG_FIELDS, "activation_func", "add_qkv_bias", "reset_attention_mask"):
        if name in signature:
            record["config"][name] = signature[name]
    for name in (*SIGNATURE_SETTINGS_FIELDS, "rope_scaling", "rope_scaling_factor"):
        if name in signature:
            record["settings"][name] = signature[name]
    return record


def config_from_record(record: Mapping[str, Any], runtime: Mapping[str, Any] | None = None,
                       use_cpu_initialization: bool = False) -> tuple[MoCConfig, ModelSettings]:
    """The ``MoCConfig`` and ``ModelSettings`` of a model record (one process, fp32 unless ``runtime`` says)."""
    config = build_model_config(record["config"], runtime, use_cpu_initialization)
    return config, ModelSettings(**record["settings"])


def saved_flags(fields: Mapping[str, Any], settings: ModelSettings, **extra: Any) -> dict[str, Any]:
    """The flags (argument name -> value) of a model given as data, as a checkpoint stores them under
    ``"args"`` (Megatron-LM's convention; tools read the vocabulary and tokenizer there); ``extra`` adds more."""
    flags = {flag: fields[field] for flag, field in MODEL_FLAGS.items() if field in fields}
    flags.update({f.name: fields[f.name] for f in moc_fields() if f.name in fields})
    flags.update(
        swiglu=fields.get("activation_func") == "silu" and bool(fields.get("gated_linear_unit")),
        max_position_embeddings=settings.max_sequence_length, rotary_base=settings.rotary_base,
        untie_embeddings_and_output_weights=not settings.tie_embeddings, use_rope_scaling=settings.rope_scaling,
        rope_scaling_factor=settings.rope_scaling_factor,
    )
    flags.update(extra)
    return flags
