"""Layer specs: ordinary decoder layers, and memory layers whose cross-attention slot reads the bank.

Transformer Engine specs are used when TE is importable, megatron-core's local modules otherwise;
a memory layer differs from an ordinary one only in ``pre_cross_attn_layernorm``, ``cross_attention``
and ``cross_attn_bda``.
"""

from __future__ import annotations

import copy

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from moc_megatron.config import MoCConfig
from moc_megatron.memory.memory_attention import MoCMemoryAttention, MoCMemorySubmodules
from moc_megatron.memory.norm import MemoryRMSNorm, TEMemoryRMSNorm
from moc_megatron.model.core_attention import SDPACoreAttention
from moc_megatron.model.norm import LocalNorm
from moc_megatron.platform.megatron_versions import mlp_submodule


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch modules import."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises more than ImportError when CUDA is missing
        return False
    return True


def local_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """A decoder layer from megatron-core's own modules (runs anywhere, CPU included); ``qk_layernorm``:
    a norm (``config.normalization``) on each query and key head."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=LocalNorm if qk_layernorm else IdentityOp,
                    k_layernorm=LocalNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LocalNorm,
            mlp=mlp_submodule(MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as Transformer Engine's fused norm+linear modules.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def te_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's Transformer Engine decoder layer (FP8-capable on H100)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def with_masked_core_attention(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` whose self-attention computes with :class:`SDPACoreAttention`, which takes the block-causal mask
    of separated documents (``--reset-attention-mask``); the linears stay the spec's (Transformer Engine's)."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def local_memory_submodules() -> MoCMemorySubmodules:
    """The memory read from megatron-core's tensor-parallel linears and torch's RMSNorm."""
    return MoCMemorySubmodules(linear_q=ColumnParallelLinear, linear_k=ColumnParallelLinear,
                               linear_v=ColumnParallelLinear, linear_o=RowParallelLinear,
                               shared_norm=MemoryRMSNorm, routed_norm=MemoryRMSNorm)


def te_memory_submodules() -> MoCMemorySubmodules:
    """The memory read from Transformer Engine's linears and RMSNorm (FP8 under megatron's fp8 context)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return MoCMemorySubmodules(linear_q=TEColumnParallelLinear, linear_k=TEColumnParallelLinear,
                               linear_v=TEColumnParallelLinear, linear_o=TERowParallelLinear,
                               shared_norm=TEMemoryRMSNorm, routed_norm=TEMemoryRMSNorm)


def memory_layer_spec(base: ModuleSpec, use_te: bool) -> ModuleSpec:
    """``base`` with the MoC memory read (TE or local submodules) in its cross-attention slot."""
    spec = copy.deepcopy(base)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = LocalNorm
    spec.submodules.pre_cross_attn_layernorm = norm
    submodules = te_memory_submodules() if use_te else local_memory_submodules()
    spec.submodules.cross_attention = ModuleSpec(module=MoCMemoryAttention, submodules=submodules)
    spec.submodules.cross_attn_bda = get_bias_dropout_add
    return spec


def block_spec(config: MoCConfig, use_te: bool | None = None, vp_stage: int | None = None,
               num_layers_on_stage: int | None = None) -> TransformerBlockSubmodules:
    """Specs for the layers this pipeline stage builds, memory layers where the config says."""
    if use_te is None:
        use_te = transformer_engine_available()
    base = te_layer_spec(config.qk_layernorm) if use_te else local_layer_spec(config.qk_layernorm)
    if use_te and config.reset_attention_mask:
        base = with_masked_core_attention(base)
    memory = memory_layer_spec(base, use_te)
    if num_layers_on_stage is None:
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        num_layers_on_stage = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = [
        memory if offset + i in config.moc_memory_layers else base for i in range(num_layers_on_stage)
    ]
    final_norm = base.submodules.input_layernorm if not use_te else norm_for_te()
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def norm_for_te():
    """Transformer Engine's norm for the final layer norm."""
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm
