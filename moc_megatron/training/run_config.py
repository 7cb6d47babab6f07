"""The typed configuration of a training run, built once from the validated command line.

:func:`moc_megatron.training.validate_args.validate_args` checks the parsed ``argparse.Namespace`` and returns
its frozen :class:`RunConfig` (:func:`moc_megatron.training.config_from_args.build_run_config`); everything
in ``training/`` after that reads these dataclasses, never the namespace. Field names are the flags' argument
names (``--lr-decay-iters`` -> ``lr_decay_iters``), so the builder copies them by name and a field cannot
drift from its flag.

``RunConfig.saved_args`` is what checkpoints store under ``"args"`` (the flags' simple values, Megatron-LM's
convention: export and evaluation read the tokenizer and vocabulary there; the model itself is stored as
data, :mod:`moc_megatron.checkpoint.model_config`); :meth:`RunConfig.replace` keeps it in step with a
changed field.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moc_megatron.config import MoCConfig

Blend = tuple[list[str], list[float] | None]


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout and how gradients and parameters are communicated."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    expert_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    """``None`` without an interleaved pipeline (a single virtual stage is ``None`` too)."""
    data_parallel_size: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    distributed_timeout_minutes: int
    use_cpu_initialization: bool


@dataclass(frozen=True)
class ScheduleConfig:
    """Batch sizes, iterations, the learning-rate and weight-decay schedule, and the NaN/Inf policy."""

    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    """Micro-batches per step on each data-parallel rank: global batch / (micro batch x DP)."""
    train_iters: int
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: int
    lr_decay_iters_derived: bool
    """``--lr-decay-iters`` was not given (it defaults to ``--train-iters``; a resume may keep the checkpoint's)."""
    lr_warmup_iters: int
    lr_warmup_fraction: float | None
    lr_warmup_init: float
    lr_wsd_decay_style: str
    lr_wsd_decay_iters: int | None
    override_opt_param_scheduler: bool
    use_checkpoint_opt_param_scheduler: bool
    weight_decay: float
    start_weight_decay: float
    end_weight_decay: float
    weight_decay_incr_style: str
    check_for_nan_in_loss_and_grad: bool
    skip_nan_loss_iterations: bool


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer, its precision, and the memory layers' and bank's own learning rates and weight decay."""

    optimizer: str
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    sgd_momentum: float
    bf16: bool
    accumulate_allreduce_grads_in_fp32: bool
    moc_memory_lr: float | None
    """Peak LR of the memory layers (``None``: ``--lr``)."""
    moc_bank_lr: float | None
    """Peak LR of the memory bank (``None``: ``--lr``)."""
    moc_freeze_bank: bool
    moc_memory_weight_decay: float | None = None
    """Weight decay of the memory layers' matrices (``None``: ``--weight-decay``)."""
    moc_bank_weight_decay: float | None = None
    """Weight decay of the memory bank (``None``: ``--weight-decay``)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are read."""

    data_blend: Blend | None
    """``(prefixes, weights)`` of ``--data-path``."""
    data_blend_per_split: list[Blend | None] | None
    """Train/valid/test blends of ``--train/valid/test-data-path``."""
    split: str
    mock_data: bool
    seq_length: int
    tokenizer_type: str | None
    tokenizer_model: str | None
    vocab_size: int | None
    data_cache_path: str | None
    num_workers: int
    eod_mask_loss: bool
    reset_position_ids: bool = False
    """Position ids restart at every document (Megatron-LM's ``--reset-position-ids``; with RoPE, positions act
    through the block-causal mask of ``--reset-attention-mask``, which it requires)."""
    sft_data_path: str | None = None
    """``finetune_moc.py``'s chat data (``tools/preprocess_sft.py`` output prefix)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """What is saved and loaded, and where."""

    save: str | None
    save_interval: int | None
    no_save_optim: bool
    no_save_rng: bool
    load: str | None
    no_load_optim: bool
    no_load_rng: bool
    finetune: bool
    """Load only the weights and start at iteration 0."""
    exit_on_missing_checkpoint: bool
    ckpt_format: str
    dist_ckpt_optim_fully_reshardable: bool
    pretrained_checkpoint: str | None = None
    """``finetune_moc.py``'s ``--pretrained-checkpoint``."""


@dataclass(frozen=True)
class LoggingConfig:
    """Log lines, TensorBoard, and validation passes."""

    log_interval: int
    tensorboard_dir: str | None
    eval_interval: int
    eval_iters: int


@dataclass(frozen=True)
class EmbeddingConfig:
    """The model-level settings megatron-core keeps outside ``TransformerConfig`` (``ModelSettings``)."""

    make_vocab_size_divisible_by: int
    max_position_embeddings: int
    untie_embeddings_and_output_weights: bool
    rotary_base: int
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run reads, in one frozen object."""

    parallel: ParallelConfig
    schedule: ScheduleConfig
    optimizer: OptimizerSettings
    data: DataConfig
    checkpointing: CheckpointConfig
    logging: LoggingConfig
    embedding: EmbeddingConfig
    model: MoCConfig
    """The model configuration (megatron's schedules install their hooks on it during setup)."""
    seed: int
    saved_args: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    """The flags as checkpoints store them (read-only; :meth:`replace` updates it)."""

    def replace(self, section: str, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied to the ``section`` dataclass (and to :attr:`saved_args`)."""
        updated = dataclasses.replace(getattr(self, section), **changes)
        saved = dict(self.saved_args)
        saved.update({k: v for k, v in changes.items() if k in saved})
        return dataclasses.replace(self, **{section: updated}, saved_args=types.MappingProxyType(saved))


SECTIONS: dict[str, type] = {
    "parallel": ParallelConfig, "schedule": ScheduleConfig, "optimizer": OptimizerSettings, "data": DataConfig,
    "checkpointing": CheckpointConfig, "logging": LoggingConfig, "embedding": EmbeddingConfig,
}
"""The :class:`RunConfig` sections whose fields are copied by name from the parsed flags."""
