"""Dense Hugging Face families that import as a MoC backbone, and what each one maps to.

A source ``config.json`` (``model_type`` ``llama``, ``mistral``, ``qwen2``, ``qwen3``; SmolLM2 and the Llama 3.x
models are ``llama``) becomes the backbone fields of the MoC ``config.json``. Whatever the family needs is
expressed with megatron-core's own options: q/k/v biases (``add_qkv_bias``), per-head q/k RMSNorm
(``qk_layernorm``), Llama 3.x RoPE scaling (``rope_scaling``, whose only free parameter in megatron-core 0.16.1 is
the factor). Anything else that would change the computation is refused in one line naming the field.
"""

from __future__ import annotations

from moc_megatron.errors import MoCError
from moc_megatron.hf.names import LLAMA3_ROPE_FIXED, rope_parameters

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = ("MoC folders exported by tools/convert_checkpoint.py and dense " + ", ".join(FAMILIES.values())
             + " models")


class UnsupportedSourceError(MoCError, ValueError):
    """The dense model has a feature the MoC backbone cannot express (the message names the field)."""


def _family(cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return model_type
    archs = cfg.get("architectures") or []
    for family, arch in FAMILIES.items():
        if arch in archs:
            return family
    raise UnsupportedSourceError(f"unsupported architecture {model_type!r} {archs}: supported are {SUPPORTED}")


def _rope(cfg: dict, problems: list[str]) -> dict:
    """``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (4.x files) as the MoC field."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} (RoPE on every head dimension only)")
    if rope_type == "default":
        return rope_parameters(theta, None)
    if rope_type != "llama3":
        problems.append(f"rope_parameters.rope_type={rope_type!r} (only default RoPE and llama3 scaling)")
        return rope_parameters(theta, None)
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        if float(rope.get(key, fixed)) != fixed:
            problems.append(f"rope_parameters.{key}={rope.get(key)} (megatron-core 0.16.1's llama3 RoPE scaling "
                            f"fixes it at {fixed:g})")
    return rope_parameters(theta, float(rope.get("factor", 8.0)))


def _sliding_window(family: str, cfg: dict, problems: list[str]) -> None:
    """An attention window that can bind is refused; one that never does (none, or >= the context) is not."""
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={sorted(set(layer_types))} (only full_attention layers)")
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        problems.append(f"use_sliding_window=True (sliding_window={cfg.get('sliding_window')}: sliding-window "
                        "attention is not supported)")
    window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings", 2048)
    if family == "mistral" and window is not None and window < context:
        problems.append(f"sliding_window={window} < max_position_embeddings={context} (sliding-window attention "
                        "is not supported)")


def backbone_from_dense(cfg: dict) -> dict:
    """The MoC ``config.json`` backbone fields of a dense source ``config.json`` (memory fields come from flags).

    Raises :class:`UnsupportedSourceError` (one line, naming each field) for what the backbone cannot express.
    """
    family = _family(cfg)
    problems: list[str] = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r} (only SwiGLU with silu)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=True (MLP biases)")
    if family != "qwen2" and cfg.get("attention_bias"):
        problems.append("attention_bias=True (o_proj has a bias too; megatron-core's add_qkv_bias covers q/k/v only)")
    _sliding_window(family, cfg, problems)
    rope = _rope(cfg, problems)
    if problems:
        raise UnsupportedSourceError(f"cannot import this {family} model: " + "; ".join(problems))
    heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=rope, initializer_range=cfg.get("initializer_range", 0.02),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", memory_layers=[],
    )
