"""The memory module's linears and norms come from its ModuleSpec; the checkpoint keys are frozen.

A Hugging Face converter is written against these exact keys: a change here is a checkpoint format change.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from moc_megatron.config import MoCConfig
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.model.layer_specs import block_spec, local_memory_submodules

pytestmark = pytest.mark.usefixtures("mcore_world")

# hidden 32, 4 memory heads of 8, 2 key/value heads, bank width 32, 5 chapters x 4 tokens (1 shared).
MEMORY_LAYER_KEYS = {
    "linear_q.weight": (32, 32),
    "linear_q._extra_state": None,
    "linear_k.weight": (16, 32),
    "linear_k._extra_state": None,
    "linear_v.weight": (16, 32),
    "linear_v._extra_state": None,
    "linear_o.weight": (32, 32),
    "linear_o._extra_state": None,
    "shared_norm.weight": (32,),
    "routed_norm.weight": (32,),
    "router.weight": (4, 32),
    "router.bias": (4,),
}
OWN_BANK_KEYS = {"own_bank.shared": (1, 4, 32), "own_bank.routed": (4, 4, 32)}


def _config(**kw) -> MoCConfig:
    return MoCConfig(num_layers=2, hidden_size=32, num_attention_heads=4, moc_memory_layers=[1], moc_num_chapters=5,
                     moc_top_k=2, moc_chapter_size=4, moc_num_query_groups=2, use_cpu_initialization=True, **kw)


def _shapes(state: dict) -> dict:
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) and not k.endswith("_extra_state") else None)
            for k, v in state.items()}


def test_memory_layer_state_dict_keys_are_frozen():
    own = MoCMemoryAttention(_config(moc_shared_bank=False), layer_number=1)
    assert _shapes(own.state_dict()) == {**MEMORY_LAYER_KEYS, **OWN_BANK_KEYS}
    shared = MoCMemoryAttention(_config(), layer_number=1)
    assert _shapes(shared.state_dict()) == MEMORY_LAYER_KEYS


def test_model_checkpoint_keys_of_a_memory_layer_are_frozen():
    from moc_megatron.model.moc_model import MoCGPTModel

    model = MoCGPTModel(_config(), 64, 16)
    prefix = "decoder.layers.1.cross_attention."
    sharded = {k[len(prefix):] for k in model.sharded_state_dict() if k.startswith(prefix)}
    assert sharded == set(MEMORY_LAYER_KEYS)
    assert {k for k in model.state_dict() if "bank" in k} == {"memory_bank.shared", "memory_bank.routed"}


def test_local_spec_builds_megatron_tensor_parallel_linears():
    spec = block_spec(_config(), use_te=False, num_layers_on_stage=2).layer_specs[1].submodules.cross_attention
    assert spec.module is MoCMemoryAttention and spec.submodules == local_memory_submodules()
    module = MoCMemoryAttention(_config(), submodules=spec.submodules, layer_number=1)
    for name in ("linear_q", "linear_k", "linear_v"):
        assert type(getattr(module, name)) is ColumnParallelLinear
    assert type(module.linear_o) is RowParallelLinear
    assert type(module.shared_norm) is torch.nn.RMSNorm and type(module.routed_norm) is torch.nn.RMSNorm


def test_te_spec_names_transformer_engine_modules():
    """The TE spec's submodules are megatron's TE linears and TE's RMSNorm (they build only where TE imports)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    from moc_megatron.memory.norm import TEMemoryRMSNorm
    from moc_megatron.model.layer_specs import te_memory_submodules

    sub = te_memory_submodules()
    assert sub.linear_q is sub.linear_k is sub.linear_v is TEColumnParallelLinear
    assert sub.linear_o is TERowParallelLinear
    assert sub.shared_norm is sub.routed_norm is TEMemoryRMSNorm


def test_separated_documents_use_the_masked_core_attention_with_any_linears():
    from moc_megatron.model.core_attention import SDPACoreAttention
    from moc_megatron.model.layer_specs import local_layer_spec, with_masked_core_attention

    spec = local_layer_spec()
    spec.submodules.self_attention.submodules.core_attention = object  # as a spec whose attention ignores masks
    masked = with_masked_core_attention(spec)
    assert masked.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    assert masked.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear
    assert spec.submodules.self_attention.submodules.core_attention is object  # the original is untouched
