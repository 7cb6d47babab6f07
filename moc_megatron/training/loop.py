"""``pretrain``: the whole run, from process groups to the final checkpoint.

The run is described by a :class:`RunConfig` (:func:`moc_megatron.training.arguments.parse_run_config`).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

from moc_megatron import platform
from moc_megatron.checkpoint.layout import check_save_target
from moc_megatron.config import MoCConfig
from moc_megatron.data.tokenizer_record import TokenizerRecord, record_from_tokenizer
from moc_megatron.parallel.bank_group import destroy_bank_groups
from moc_megatron.platform.distributed import restart_round
from moc_megatron.training.checkpointing import load_training_state, save_checkpoint
from moc_megatron.training.config_from_args import run_model_settings
from moc_megatron.training.data import (
    DatasetTokenizer,
    build_datasets,
    check_data_inputs,
    data_iterators,
    dataset_tokenizer,
)
from moc_megatron.training.fault_injection import maybe_kill_rank
from moc_megatron.training.logging import (
    TrainingLogger,
    print_rank_0,
    print_rank_last,
    reduce_memory_aux_losses,
    reset_memory_statistics,
    tensorboard_note,
)
from moc_megatron.training.nan_check import NonFiniteLossError, is_nonfinite, nonfinite_loss_message
from moc_megatron.training.optimizer import role_lrs
from moc_megatron.training.run_config import DataConfig, RunConfig, ScheduleConfig
from moc_megatron.training.setup import TrainingStack, build_training_stack, count_parameters, initialize
from moc_megatron.training.train_step import LM_LOSS, evaluate, train_step


@dataclass
class PretrainResult:
    """What a run did (losses are known on the last pipeline stage only)."""

    start_iteration: int
    iteration: int
    lm_losses: dict[int, float] = field(default_factory=dict)
    """Training ``lm loss`` per iteration (on the last pipeline stage; empty elsewhere)."""
    validation_losses: dict[int, float] = field(default_factory=dict)
    checkpoint: str | None = None
    """Path of the last checkpoint this run saved."""
    skipped_iterations: list[int] = field(default_factory=list)
    """Iterations whose optimizer step was skipped for a NaN/Inf loss (``--skip-nan-loss-iterations``)."""


def _tokenizer(run: RunConfig) -> tuple[DatasetTokenizer, int | None]:
    """The datasets' view of the tokenizer, and its vocabulary size (``None`` without a tokenizer)."""
    tokenizer, vocab, _ = _tokenizer_and_record(run.data)
    return tokenizer, vocab


def _tokenizer_and_record(data: DataConfig) -> tuple[DatasetTokenizer, int | None, TokenizerRecord | None]:
    """As :func:`_tokenizer`, plus the tokenizer's record (``None`` without a tokenizer)."""
    if data.tokenizer_type is None:
        return dataset_tokenizer(vocab_size=data.vocab_size), None, None
    from moc_megatron.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
    name = f"{data.tokenizer_type}:{data.tokenizer_model}"
    record = record_from_tokenizer(tokenizer, data.tokenizer_type, data.tokenizer_model)
    return dataset_tokenizer(tokenizer, name=name), tokenizer.vocab_size, record


def check_inputs(data: DataConfig) -> tuple[DatasetTokenizer, int | None, TokenizerRecord | None]:
    """Build the tokenizer and check every dataset against it (what a run checks before any process group).

    Returns :func:`_tokenizer_and_record`'s values; raises the start-up errors of ``check_data_inputs``
    (a missing, truncated or corrupt dataset, data made with another tokenizer) and of the tokenizer.
    """
    tokenizer, vocab, record = _tokenizer_and_record(data)
    check_data_inputs(data, record)
    return tokenizer, vocab, record


def _log_restart(iteration: int, load: str | None) -> None:
    """After a torchrun restart (any rank's ``TORCHELASTIC_RESTART_COUNT`` > 0), say so in one line, with
    the iteration this round starts from (collective: a node whose own ranks did not fail keeps count 0)."""
    restarts = torch.tensor([restart_round()], dtype=torch.int64, device=platform.get_device())
    torch.distributed.all_reduce(restarts, op=torch.distributed.ReduceOp.MAX)
    if restarts.item() == 0:
        return
    start = f"resuming from iteration {iteration} ({load})" if iteration else f"starting from scratch ({load})"
    print_rank_0(f" > restart: torchrun restarted the ranks after a rank failed (restart {restarts.item()} of "
                 f"--max-restarts {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}); {start}")


def _role_lrs(run: RunConfig) -> dict[str, tuple[float, float]]:
    return role_lrs(run.schedule.lr, run.schedule.min_lr, run.optimizer.moc_memory_lr, run.optimizer.moc_bank_lr)


def _learning_rates(stack: TrainingStack, run: RunConfig) -> dict[str, float]:
    lrs = {"backbone": get_canonical_lr_for_logging(stack.optimizer.param_groups)}
    for role, (peak, low) in _role_lrs(run).items():
        if role != "backbone" and peak != run.schedule.lr:
            lrs[role] = stack.scheduler.get_lr({"max_lr": peak, "min_lr": low})
    return lrs


def _print_setup(run: RunConfig, config: MoCConfig, stack: TrainingStack, vocab: int) -> None:
    par = run.parallel
    print_rank_0(
        f" > MoC model: {config.num_layers} layers, hidden {config.hidden_size}, vocab {vocab} (padded), "
        f"memory layers {sorted(config.moc_memory_layers)}"
        + (f", {config.moc_num_chapters} chapters x {config.moc_chapter_size} tokens, top-{config.moc_top_k}"
           if config.has_memory else "")
        + f"\n > parallel: TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
        f"EP={par.expert_model_parallel_size} DP={par.data_parallel_size} "
        f"VPP={par.virtual_pipeline_model_parallel_size}; micro-batches per step {run.schedule.num_microbatches}"
        f"\n > parameters on rank 0: {count_parameters(stack.model):,}"
    )
    for role, (peak, low) in _role_lrs(run).items():
        if role == "bank" and run.optimizer.moc_freeze_bank:
            print_rank_0(" > learning rate bank: frozen (no gradient, no optimizer state)")
        elif config.has_memory or role == "backbone":
            print_rank_0(f" > learning rate {role}: max {peak:.3E} min {low:.3E}")
    opt = run.optimizer
    for role, decay in (("memory", opt.moc_memory_weight_decay), ("bank", opt.moc_bank_weight_decay)):
        if decay is not None:
            print_rank_0(f" > weight decay {role}: {decay:g} (--weight-decay {run.schedule.weight_decay:g})")


def _resume_hint(run: RunConfig, path: str) -> str:
    """Where the checkpoint is, and the command that continues from it."""
    argv = list(sys.argv[1:])
    if "--load" in argv:
        i = argv.index("--load")
        del argv[i:i + 2]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "pretrain_moc.py"
    world, save = run.parallel.world_size, run.checkpointing.save
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world == 1:
        launcher = "python"
    elif local == world:
        launcher = f"torchrun --nproc_per_node={local}"
    else:
        launcher = "<the same torchrun/srun launcher>"
    command = f"{launcher} {shlex.join([script, *argv, '--load', save])}"
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    return (f" checkpoint saved to {path} (tracker: {tracker})\n"
            f" to resume, run the same command with --load {save}:\n   {command}\n"
            f" (to train further, raise --train-iters: the checkpoint's LR schedule (--lr-decay-iters "
            f"{run.schedule.lr_decay_iters}) is kept; add --override-opt_param-scheduler to re-plan it)")


def pretrain(run: RunConfig, datasets_provider=None, forward_step_func=None) -> PretrainResult:
    """Train for ``--train-iters`` iterations (resuming from ``--load``); collective over all ranks.

    ``datasets_provider(run, tokenizer) -> (train, valid, test)`` replaces :func:`build_datasets` and
    ``forward_step_func`` replaces :func:`train_step.forward_step` (both used by ``finetune_moc.py``).
    """
    ckpt = run.checkpointing
    check_save_target(ckpt.save, ckpt.load, ckpt.finetune)  # before anything is built or written
    datasets_provider = datasets_provider or build_datasets
    step_kwargs = {} if forward_step_func is None else {"forward_step_func": forward_step_func}
    tokenizer, tokenizer_vocab, record = check_inputs(run.data)  # before any process group: every rank stops
    initialize(run)
    config = run.model
    settings = run_model_settings(run, tokenizer_vocab)
    stack = build_training_stack(run, config, settings)
    _print_setup(run, config, stack, settings.vocab_size)
    loaded = load_training_state(run, stack.model, stack.optimizer, stack.scheduler, config, settings,
                                 tokenizer_record=record)
    run, iteration, consumed = loaded.run, loaded.iteration, loaded.consumed_train_samples
    result = PretrainResult(start_iteration=iteration, iteration=iteration)
    schedule, ckpt, log = run.schedule, run.checkpointing, run.logging

    train_ds, valid_ds, _ = datasets_provider(run, tokenizer)
    chunks = len(stack.model)
    train_iterators = data_iterators(train_ds, consumed, run, chunks) if iteration < schedule.train_iters else None
    # Middle pipeline stages build no dataset but take part in every evaluation pass.
    do_valid = log.eval_iters > 0 and _on_any_rank(valid_ds is not None)

    note = tensorboard_note(log.tensorboard_dir, iteration)
    if note:
        print_rank_0(note)
    logger = TrainingLogger(run, config, stack.model)
    reset_memory_statistics(stack.model)  # start the router statistics from this run's first step
    last_saved = iteration
    _log_restart(iteration, ckpt.load)
    print_rank_0(f" > training from iteration {iteration} to {schedule.train_iters}")
    while iteration < schedule.train_iters:
        step = train_step(run, train_iterators, stack.model, stack.optimizer, stack.scheduler, **step_kwargs)
        iteration += 1
        _check_finite(schedule, step, iteration, result)
        maybe_kill_rank(iteration)
        consumed += schedule.global_batch_size
        aux = reduce_memory_aux_losses(config, schedule.num_microbatches)
        if LM_LOSS in step.losses:
            result.lm_losses[iteration] = step.losses[LM_LOSS]
        logger.training_iteration(iteration, consumed, step.losses, aux, step.grad_norm,
                                  _learning_rates(stack, run), step.update_successful,
                                  stack.optimizer.get_loss_scale().item())
        paused = time.perf_counter()
        if do_valid and iteration % log.eval_interval == 0:
            _validate(run, valid_ds, stack, iteration, logger, result, **step_kwargs)
        if ckpt.save and ckpt.save_interval and iteration % ckpt.save_interval == 0:
            result.checkpoint = save_checkpoint(run, iteration, stack.model, stack.optimizer, stack.scheduler,
                                                config, settings, consumed, tokenizer_record=record)
            last_saved = iteration
            print_rank_0(f" saved checkpoint at iteration {iteration} to {result.checkpoint}")
        logger.exclude(time.perf_counter() - paused)
    result.iteration = iteration
    if do_valid and iteration % log.eval_interval and iteration > result.start_iteration:
        _validate(run, valid_ds, stack, iteration, logger, result, **step_kwargs)
    if ckpt.save and iteration > last_saved:
        result.checkpoint = save_checkpoint(run, iteration, stack.model, stack.optimizer, stack.scheduler,
                                            config, settings, consumed, tokenizer_record=record)
    logger.close()
    reset_memory_statistics(stack.model)
    if result.checkpoint:
        print_rank_last(_resume_hint(run, result.checkpoint))
    destroy_bank_groups()
    return result


def _check_finite(schedule: ScheduleConfig, step, iteration: int, result: PretrainResult) -> None:
    """Stop (or, with ``--skip-nan-loss-iterations``, note the skip) on a NaN/Inf loss or grad norm."""
    if not schedule.check_for_nan_in_loss_and_grad:
        return
    if step.nonfinite_loss:
        if not schedule.skip_nan_loss_iterations:
            raise NonFiniteLossError(nonfinite_loss_message(iteration))
        result.skipped_iterations.append(iteration)
        print_rank_0(f" iteration {iteration}: loss is NaN or Inf, optimizer step skipped (--skip-nan-loss-iterations)")
    elif is_nonfinite(step.grad_norm):
        raise NonFiniteLossError(nonfinite_loss_message(iteration, "gradient norm"))


def _on_any_rank(flag: bool) -> bool:
    value = torch.tensor([int(flag)], device=platform.get_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _validate(run: RunConfig, valid_ds, stack: TrainingStack, iteration: int, logger: TrainingLogger,
              result: PretrainResult, **step_kwargs) -> None:
    iterators = data_iterators(valid_ds, 0, run, len(stack.model))
    losses = evaluate(run, iterators, stack.model, **step_kwargs)
    logger.validation(iteration, losses)
    if LM_LOSS in losses:
        result.validation_losses[iteration] = losses[LM_LOSS]
