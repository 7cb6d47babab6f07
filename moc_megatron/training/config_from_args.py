"""Parsed arguments -> megatron-core configurations (``MoCConfig``, DDP, optimizer) and model settings."""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from moc_megatron import platform
from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings, pad_vocab_size
from moc_megatron.training.moc_flags import moc_config_kwargs

# Flags whose argument name is the TransformerConfig field name.
_SAME_NAME_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "init_method_std", "hidden_dropout", "attention_dropout", "qk_layernorm", "add_bias_linear",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "bf16",
)

# Flags whose argument name is the OptimizerConfig field name.
_OPTIMIZER_FIELDS = (
    "optimizer", "lr", "min_lr", "weight_decay", "bf16", "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum",
    "use_distributed_optimizer", "clip_grad", "overlap_param_gather",
)


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """Parameter dtype of the model: bf16 with ``--bf16``, fp32 otherwise."""
    return torch.bfloat16 if args.bf16 else torch.float32


def transformer_config_from_args(args: argparse.Namespace) -> MoCConfig:
    """The model configuration the flags describe (as Megatron-LM's ``core_transformer_config_from_args``)."""
    kwargs = {name: getattr(args, name) for name in _SAME_NAME_FIELDS}
    kwargs.update(moc_config_kwargs(args))
    dtype = params_dtype(args)
    kwargs.update(
        layernorm_epsilon=args.norm_epsilon,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        moc_bank_seed=args.moc_bank_seed if args.moc_bank_seed is not None else args.seed,
        # Pipeline outputs already sent downstream are freed to their grad_fn, as in Megatron-LM.
        deallocate_pipeline_outputs=True,
        # Unbatched isend/irecv: megatron's batched p2p ops, issued in one fixed order, pair an activation
        # with a gradient when the previous and next stage are the same rank (PP=2, interleaved) on gloo.
        # The unbatched path orders them by rank parity (and what Megatron-LM uses with overlapped p2p).
        batch_p2p_comm=False,
        # Weights are created where they live; on a CPU that is the CPU.
        use_cpu_initialization=args.use_cpu_initialization or platform.get_device().type == "cpu",
    )
    if args.swiglu:
        kwargs.update(gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False)
    kwargs.update(platform.pipeline_config_overrides())
    with warnings.catch_warnings():
        for message in _INAPPLICABLE_CONFIG_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return MoCConfig(**kwargs)


# megatron's TransformerConfig warnings that do not apply to a MoC model: under EP, MoCConfig sets
# num_moe_experts (megatron's expert-parallel groups need it) but the model has no MoE MLP or MoE router;
# "full scope" is the default cuda_graph_scope, and no CUDA graph is captured.
_INAPPLICABLE_CONFIG_WARNINGS = (
    r"moe_ffn_hidden_size is not set",
    r"Using a large number of experts .* without fp32 routing",
    r"full scope is deprecated",
)


def ddp_config_from_args(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """megatron-core DDP settings (gradient buffers in fp32 under bf16, as Megatron-LM)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        # NaN/Inf is checked on the loss before the optimizer step (nan_check.py, with the iteration and
        # --skip-nan-loss-iterations); megatron's own bucket check reports through its rerun state machine,
        # which asks for a CUDA device and knows no iteration of ours.
        check_for_nan_in_grad=False,
    )


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    """megatron-core optimizer settings (learning-rate groups are added by ``training/optimizer.py``)."""
    kwargs = {name: getattr(args, name) for name in _OPTIMIZER_FIELDS}
    kwargs.update(params_dtype=params_dtype(args), weight_decay=args.start_weight_decay)
    return OptimizerConfig(**kwargs)


def model_settings_from_args(args: argparse.Namespace, tokenizer_vocab_size: int | None = None) -> ModelSettings:
    """Vocabulary (the tokenizer's, else ``--vocab-size``, padded as Megatron-LM does), length, tying, RoPE."""
    vocab = tokenizer_vocab_size if tokenizer_vocab_size is not None else args.vocab_size
    return ModelSettings(
        vocab_size=pad_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size),
        max_sequence_length=args.max_position_embeddings,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
    )
