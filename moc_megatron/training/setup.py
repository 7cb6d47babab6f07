"""Process groups, seeds, and the model/optimizer/scheduler stack of a training run."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from moc_megatron import platform
from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings, build_model_chunks
from moc_megatron.parallel.bank_group import (
    finalize_model_grads_with_bank,
    initialize_bank_groups,
    mark_bank_parameters,
)
from moc_megatron.training.config_from_args import ddp_config, optimizer_config
from moc_megatron.training.optimizer import build_optimizer, freeze_bank
from moc_megatron.training.run_config import RunConfig
from moc_megatron.training.schedule import build_scheduler


class _DropMessages(logging.Filter):
    """A logging filter that drops records whose message matches one of the patterns."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# megatron-core notices that say nothing about our runs: mock data has no index cache to save, a blend's
# small index is rebuilt on every start without --data-cache-path (the GPT datasets' caches go beside the
# data and keep their notices), and the rerun state machine (fault injection / result validation) is not
# used and stays disabled.
_INAPPLICABLE_NOTICES = {
    "megatron.core.datasets.gpt_dataset": (r"^Unable to save MockGPTDataset indexes because path_to_cache is None",),
    "megatron.core.datasets.blended_dataset": (r"^Cannot save the BlendedDataset indexes because path_to_cache",),
    "megatron.core.rerun_state_machine": (r"^Implicit initialization of Rerun State Machine!",
                                          r"^RerunStateMachine initialized in mode RerunMode\.DISABLED"),
}


def quiet_inapplicable_notices() -> None:
    """Install, once, logging filters for the megatron-core notices in ``_INAPPLICABLE_NOTICES`` (others stay)."""
    for name, patterns in _INAPPLICABLE_NOTICES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(patterns))


def initialize(run: RunConfig) -> None:
    """torch.distributed + megatron-core parallel state for the run's layout, then the seeds."""
    quiet_inapplicable_notices()
    par = run.parallel
    platform.initialize_distributed(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        timeout_minutes=par.distributed_timeout_minutes,
    )
    set_random_seed(run.seed)


def set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: ``seed + 100 * pipeline rank`` for python, numpy, torch and the RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    platform.model_parallel_manual_seed(seed)


@dataclass
class TrainingStack:
    """The DDP-wrapped model chunks, the optimizer and the LR scheduler of one run."""

    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def build_training_stack(run: RunConfig, config: MoCConfig,
                         settings: ModelSettings) -> TrainingStack:
    """Build the chunks, freeze the bank if asked, set up the bank group, wrap in DDP, build the optimizer.

    Also installs on ``config`` what megatron's schedules call (as Megatron-LM's ``training.py``):
    ``grad_scale_func``, ``finalize_model_grads_func`` (megatron's, plus the bank-group all-reduce),
    ``no_sync_func``/``param_sync_func`` when communication overlaps computation.
    """
    chunks = build_model_chunks(config, settings)
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if run.optimizer.moc_freeze_bank:
        freeze_bank(chunks)
    initialize_bank_groups(chunks)
    mark_bank_parameters(chunks, run.parallel.use_distributed_optimizer)
    device = platform.get_device()
    wrapped = []
    ddp = ddp_config(run)
    for i, chunk in enumerate(chunks):
        chunk.to(device)
        module = Float16Module(config, chunk) if run.optimizer.bf16 else chunk
        # As in Megatron-LM, only the first chunk's buffers are bucketed (the others reduce at the end).
        wrapped.append(DistributedDataParallel(config, ddp, module, disable_bucketing=i > 0))
    opt = run.optimizer
    optimizer = build_optimizer(wrapped, optimizer_config(run), opt.moc_memory_lr, opt.moc_bank_lr,
                                opt.moc_memory_weight_decay, opt.moc_bank_weight_decay)
    scheduler = build_scheduler(run.schedule, optimizer)

    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads_with_bank
    if run.parallel.overlap_grad_reduce:
        sync = [m.no_sync for m in wrapped]
        config.no_sync_func = sync[0] if len(sync) == 1 else sync
    if run.parallel.overlap_param_gather:
        gather = [m.start_param_sync for m in wrapped]
        config.param_sync_func = gather[0] if len(gather) == 1 else gather
    return TrainingStack(wrapped, optimizer, scheduler)


def count_parameters(model: list[torch.nn.Module]) -> int:
    """Parameters on this rank (all chunks)."""
    return sum(p.numel() for chunk in model for p in chunk.parameters())
