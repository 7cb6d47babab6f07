"""Parsed arguments -> the typed :class:`RunConfig`, and megatron-core's configurations built from a run.

:func:`build_run_config` is the one place that reads the validated ``argparse.Namespace``: each
:class:`RunConfig` section takes the arguments of its field names, and the model configuration
(:class:`MoCConfig`) is built through the explicit flag -> field table of
:mod:`moc_megatron.checkpoint.model_config`, as Megatron-LM's ``core_transformer_config_from_args`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import types

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from moc_megatron.checkpoint.model_config import (
    build_model_config,
    model_fields_from_flags,
    runtime_fields_from_flags,
)
from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings, pad_vocab_size
from moc_megatron.training.run_config import SECTIONS, EmbeddingConfig, RunConfig


def transformer_config_from_args(args: argparse.Namespace) -> MoCConfig:
    """The model configuration the flags describe (as Megatron-LM's ``core_transformer_config_from_args``)."""
    flags = vars(args)
    return build_model_config(model_fields_from_flags(flags), runtime_fields_from_flags(flags),
                              use_cpu_initialization=args.use_cpu_initialization)


def json_args(args: argparse.Namespace) -> dict:
    """The flags' simple values (what checkpoints store under ``"args"``), in the namespace's order."""
    simple = (str, int, float, bool, type(None))
    return {k: v for k, v in vars(args).items()
            if isinstance(v, simple) or (isinstance(v, (list, tuple)) and all(isinstance(x, simple) for x in v))}


def _section(cls: type, args: argparse.Namespace):
    """A :class:`RunConfig` section from the arguments of its field names (defaulted fields may be absent)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        elif f.default is dataclasses.MISSING:
            raise AttributeError(f"the parsed flags have no {f.name!r} (needed by {cls.__name__})")
    return cls(**values)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The frozen :class:`RunConfig` of a parsed and validated command line (built once per run)."""
    sections = {name: _section(cls, args) for name, cls in SECTIONS.items()}
    return RunConfig(**sections, model=transformer_config_from_args(args), seed=args.seed,
                     saved_args=types.MappingProxyType(json_args(args)))


def params_dtype(bf16: bool) -> torch.dtype:
    """Parameter dtype of the model: bf16 with ``--bf16``, fp32 otherwise."""
    return torch.bfloat16 if bf16 else torch.float32


def ddp_config(run: RunConfig) -> DistributedDataParallelConfig:
    """megatron-core DDP settings (gradient buffers in fp32 under bf16, as Megatron-LM)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=run.optimizer.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=run.parallel.overlap_grad_reduce,
        overlap_param_gather=run.parallel.overlap_param_gather,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
        # NaN/Inf is checked on the loss before the optimizer step (nan_check.py, with the iteration and
        # --skip-nan-loss-iterations); megatron's own bucket check reports through its rerun state machine,
        # which asks for a CUDA device and knows no iteration of ours.
        check_for_nan_in_grad=False,
    )


def optimizer_config(run: RunConfig) -> OptimizerConfig:
    """megatron-core optimizer settings (learning-rate groups are added by ``training/optimizer.py``)."""
    opt, schedule = run.optimizer, run.schedule
    return OptimizerConfig(
        optimizer=opt.optimizer, lr=schedule.lr, min_lr=schedule.min_lr, weight_decay=schedule.start_weight_decay,
        bf16=opt.bf16, params_dtype=params_dtype(opt.bf16), adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps, sgd_momentum=opt.sgd_momentum, clip_grad=opt.clip_grad,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
        overlap_param_gather=run.parallel.overlap_param_gather,
    )


def model_settings(embedding: EmbeddingConfig, vocab_size: int, tensor_model_parallel_size: int) -> ModelSettings:
    """Vocabulary (padded as Megatron-LM does), length, tying, RoPE."""
    return ModelSettings(
        vocab_size=pad_vocab_size(vocab_size, embedding.make_vocab_size_divisible_by, tensor_model_parallel_size),
        max_sequence_length=embedding.max_position_embeddings,
        tie_embeddings=not embedding.untie_embeddings_and_output_weights,
        rotary_base=embedding.rotary_base,
        rope_scaling=embedding.use_rope_scaling,
        rope_scaling_factor=embedding.rope_scaling_factor,
    )


def run_model_settings(run: RunConfig, tokenizer_vocab_size: int | None = None) -> ModelSettings:
    """:func:`model_settings` of a run: the tokenizer's vocabulary, else ``--vocab-size``."""
    vocab = tokenizer_vocab_size if tokenizer_vocab_size is not None else run.data.vocab_size
    return model_settings(run.embedding, vocab, run.parallel.tensor_model_parallel_size)
