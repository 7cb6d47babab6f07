"""Parsed arguments -> the typed :class:`RunConfig`, and megatron-core's configurations built from it.

:func:`build_run_config` is the one place that reads the validated ``argparse.Namespace`` for training:
each :class:`RunConfig` section takes the arguments of its field names, and the model configuration
(:class:`MoCConfig`) is built from the flags as Megatron-LM's ``core_transformer_config_from_args``
does. The ``*_from_args`` functions are for callers that hold flags, not a run (tools reading the
flags a checkpoint saved, tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import warnings

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from moc_megatron import platform
from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings, pad_vocab_size
from moc_megatron.training.moc_flags import moc_config_kwargs
from moc_megatron.training.run_config import SECTIONS, EmbeddingConfig, RunConfig

# Set by transformer_config_from_args itself rather than copied: the platform decides CPU initialisation,
# and the moc_ flags go through moc_config_kwargs (unset ones fall back to MoCConfig's defaults).
_NOT_COPIED = ("use_cpu_initialization",)


@functools.cache
def same_name_fields() -> tuple[str, ...]:
    """The flags whose argument name is a ``TransformerConfig`` field: copied by name into ``MoCConfig``."""
    from moc_megatron.training.arguments import build_parser  # arguments -> validate_args -> this module

    fields = {f.name for f in dataclasses.fields(MoCConfig) if not f.name.startswith("moc_")}
    dests = dict.fromkeys(a.dest for a in build_parser()._actions)
    return tuple(d for d in dests if d in fields and d not in _NOT_COPIED)


def params_dtype(bf16: bool) -> torch.dtype:
    """Parameter dtype of the model: bf16 with ``--bf16``, fp32 otherwise."""
    return torch.bfloat16 if bf16 else torch.float32


def transformer_config_from_args(args: argparse.Namespace) -> MoCConfig:
    """The model configuration the flags describe (as Megatron-LM's ``core_transformer_config_from_args``)."""
    kwargs = {name: getattr(args, name) for name in same_name_fields()}
    kwargs.update(moc_config_kwargs(args))
    dtype = params_dtype(args.bf16)
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
        use_cpu_initialization=platform.weights_on_cpu(args.use_cpu_initialization),
    )
    if args.swiglu:
        kwargs.update(gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False)
    kwargs.update(platform.transformer_config_overrides())
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


def as_run_config(run: RunConfig | argparse.Namespace) -> RunConfig:
    """``run`` itself, or the :class:`RunConfig` of a parsed command line (for callers that hold flags)."""
    return run if isinstance(run, RunConfig) else build_run_config(run)


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


def ddp_config_from_args(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """:func:`ddp_config` of a parsed command line."""
    return ddp_config(build_run_config(args))


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


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    """:func:`optimizer_config` of a parsed command line."""
    return optimizer_config(build_run_config(args))


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


def model_settings_from_args(args: argparse.Namespace, tokenizer_vocab_size: int | None = None) -> ModelSettings:
    """:func:`model_settings` of a parsed command line (or of the flags a checkpoint saved)."""
    vocab = tokenizer_vocab_size if tokenizer_vocab_size is not None else args.vocab_size
    return model_settings(_section(EmbeddingConfig, args), vocab, args.tensor_model_parallel_size)
