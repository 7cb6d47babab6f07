"""Tiny megatron-core GPT models and data for platform tests (CPU/gloo friendly).

The model follows the project's backbone at toy size: RMSNorm, RoPE, GQA self-attention, SwiGLU,
tied embeddings, megatron-core local layer spec with the project's own modules where megatron-core's
do not run on a CPU: ``core_attention`` is :class:`moc_megatron.model.core_attention.SDPACoreAttention`
(megatron-core's ``DotProductAttention`` allocates its causal mask on CUDA) and, under sequence
parallelism, the norms are :class:`moc_megatron.model.norm.LocalNorm` (megatron's ``WrappedTorchNorm``
refuses it).
Import after ``moc_megatron.platform.initialize_distributed`` has set up the parallel state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from moc_megatron import platform
from moc_megatron.model.core_attention import SDPACoreAttention
from moc_megatron.model.norm import LocalNorm

VOCAB = 128
SEQ = 16


def tiny_config(**overrides: Any) -> TransformerConfig:
    """A toy ``TransformerConfig`` for the current parallel layout (fp32, no dropout by default)."""
    fields: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    fields.update(platform.transformer_config_overrides())
    if overrides.get("bf16"):
        fields.update(params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    fields.update(overrides)
    return TransformerConfig(**fields)


def layer_spec(config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec | TransformerBlockSubmodules:
    """Local layer spec with SDPA core attention; with sequence parallelism a block spec whose
    norms are ``LocalNorm`` (``config.normalization``, sequence-parallel aware)."""
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if not config.sequence_parallel:
        return spec
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=LocalNorm)


def tiny_gpt(config: TransformerConfig, vp_stage: int | None = None, seed: int | None = 0) -> GPTModel:
    """A ``GPTModel`` for this rank's pipeline stage (RoPE, tied embeddings), built after
    ``torch.manual_seed(seed)`` unless ``seed`` is None."""
    if seed is not None:
        torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def make_batches(num: int, micro_batch_size: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``num`` micro-batches of random tokens with next-token labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        tokens = torch.randint(0, VOCAB, (micro_batch_size, SEQ + 1), generator=g)
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(SEQ).unsqueeze(0).expand(micro_batch_size, -1),
            )
        )
    return batches


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch holding all rows of ``batches``."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of ``batch`` (full model: first and last stage)."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module) -> tuple:
    """``forward_step_func`` for megatron-core's pipeline schedules (mean token loss)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / ``Float16Module`` wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
