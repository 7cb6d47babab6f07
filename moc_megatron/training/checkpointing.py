"""Save and resume training with megatron-core's ``dist_checkpointing`` (torch_dist format).

A checkpoint holds the model (``model``, or ``model0``, ``model1``, ... per virtual stage), the optimizer,
the LR scheduler, every rank's RNG states, the iteration, the data position (``consumed_train_samples``),
the parsed arguments (:attr:`RunConfig.saved_args`) and the model signature. Model weights are stored as
global tensors, so they load at any TP/PP/EP layout; a checkpoint whose model differs from the flags is
refused with the list of flags that disagree. See :mod:`moc_megatron.training.checkpoint_meta` for the
layout and the crash-safe publication of a save. The optimizer-state adaptations to megatron-core
without TE/Apex live in :mod:`moc_megatron.platform.optimizer_state`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.utils import unwrap_model

from moc_megatron.config import MoCConfig
from moc_megatron.data.tokenizer_record import (
    CHECKPOINT_KEY,
    TokenizerRecord,
    check_same_tokenizer,
    record_from_checkpoint_state,
)
from moc_megatron.model.builder import ModelSettings
from moc_megatron.platform import optimizer_state, reshardable_optimizer
from moc_megatron.platform.megatron_versions import align_saved_param_groups, load_dist_checkpoint, read_common_state
from moc_megatron.training import checkpoint_meta as meta
from moc_megatron.training.checkpoint_meta import CheckpointError, CheckpointNotFoundError
from moc_megatron.training.config_from_args import as_run_config
from moc_megatron.training.fault_injection import maybe_stall_save
from moc_megatron.training.logging import print_rank_0
from moc_megatron.training.run_config import CheckpointConfig, RunConfig, ScheduleConfig
from moc_megatron.training.save_queue import install_save_results_queue, writer_children_die_with_rank

CHECKPOINT_VERSION = 3.0


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was saved for a different model (or schedule, or tokenizer) than the flags describe."""


def parallel_layout() -> dict[str, int | None]:
    """This run's parallel sizes (stored with the checkpoint; RNG states only load at the same layout)."""
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    )


def optimizer_metadata(use_distributed_optimizer: bool, fully_reshardable: bool) -> dict:
    """megatron's optimizer ``sharded_state_dict`` metadata (stored with the checkpoint, compared on load)."""
    metadata = {"chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    return metadata


def _optimizer_metadata(run: RunConfig) -> dict:
    return optimizer_metadata(run.parallel.use_distributed_optimizer,
                              run.checkpointing.dist_ckpt_optim_fully_reshardable)


def _rng_state() -> dict:
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "device_rng_state": mcore_random._get_cuda_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    mcore_random._set_cuda_rng_state(state["device_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _rng_sharded_object() -> ShardedObject:
    """Every data-parallel rank's RNG states, one object per (PP, TP) coordinate (as Megatron-LM)."""
    group = parallel_state.get_data_parallel_group()
    states: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, _rng_state(), group=group)
    ps = parallel_state
    return ShardedObject(
        "rng_state", states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _model_keys(model: list[torch.nn.Module]) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _state_dict(model: list[torch.nn.Module], optimizer: MegatronOptimizer | None,
                scheduler: OptimizerParamScheduler | None, with_rng: bool, run: RunConfig,
                is_loading: bool, optimizer_metadata: dict | None = None) -> dict:
    state: dict = {}
    for key, chunk in zip(_model_keys(model), model):
        state[key] = unwrap_model(chunk).sharded_state_dict()
    if optimizer is not None:
        if run.parallel.use_distributed_optimizer:
            optimizer_state.allow_empty_distributed_optimizers(optimizer)
            if is_loading:
                optimizer_state.initialize_optimizer_state(optimizer)
                reshardable_optimizer.allow_model_space_load(optimizer)
        model_state = {k: state[k] for k in _model_keys(model)}
        metadata = reshardable_optimizer.sharded_state_dict_metadata(optimizer_metadata or _optimizer_metadata(run))
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def save_checkpoint(run: RunConfig | argparse.Namespace, iteration: int, model: list[torch.nn.Module],
                    optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler, config: MoCConfig,
                    settings: ModelSettings, consumed_train_samples: int,
                    tokenizer_record: TokenizerRecord | None = None) -> str:
    """Save to ``{--save}/iter_XXXXXXX`` (collective) and then point the tracker at it; return the path.

    ``tokenizer_record`` (the run's tokenizer) is stored under ``"tokenizer"`` in the common state."""
    run = as_run_config(run)
    ckpt = run.checkpointing
    root = ckpt.save
    staging = meta.staging_path(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    state = _state_dict(model, None if ckpt.no_save_optim else optimizer, scheduler, not ckpt.no_save_rng,
                        run, is_loading=False)
    state.update(
        checkpoint_version=CHECKPOINT_VERSION,
        iteration=iteration,
        train_state={"consumed_train_samples": consumed_train_samples},
        args=dict(run.saved_args),
        model_signature=meta.model_signature(config, settings),
        parallel_layout=parallel_layout(),
        optimizer_metadata=_optimizer_metadata(run),
        saved_optimizer=not ckpt.no_save_optim,
        saved_rng=not ckpt.no_save_rng,
    )
    if tokenizer_record is not None:
        state[CHECKPOINT_KEY] = tokenizer_record.to_dict()
    install_save_results_queue()
    with writer_children_die_with_rank():
        dist_checkpointing.save(state, staging)
    dist.barrier()
    maybe_stall_save(iteration)
    final = meta.checkpoint_path(root, iteration)
    if dist.get_rank() == 0:
        meta.publish_checkpoint(root, iteration)
    dist.barrier()
    return final


def _same_model_parallel_layout(a: dict, b: dict) -> bool:
    """Whether two ``parallel_layout()`` records agree in everything but the data-parallel size."""
    return {k: v for k, v in a.items() if k != "dp"} == {k: v for k, v in b.items() if k != "dp"}


def _layout_name(layout: dict) -> str:
    """``TP=2 x PP=2 x EP=2 (DP=2)`` for a ``parallel_layout()`` record."""
    name = " x ".join(f"{k.upper()}={layout.get(k)}" for k in ("tp", "pp", "ep"))
    vpp = f", VPP={layout['vpp']}" if layout.get("vpp") else ""
    return f"{name} (DP={layout.get('dp')}{vpp})"


def _same_folder(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_load_arg(ckpt: CheckpointConfig) -> tuple[str, int] | None:
    """``(checkpoint folder, iteration)`` that ``--load`` names, or ``None`` to start from scratch.

    See :func:`checkpoint_meta.resolve_load`; ``--exit-on-missing-checkpoint`` turns "nothing to load"
    into an error.
    """
    if ckpt.load is None:
        return None
    found = meta.resolve_load(ckpt.load, own_save=_same_folder(ckpt.load, ckpt.save))
    if found is None and ckpt.exit_on_missing_checkpoint:
        raise CheckpointNotFoundError(f"--load {ckpt.load}: no checkpoint (--exit-on-missing-checkpoint)")
    return found


# OptimizerParamScheduler state -> the flags that set it (megatron asserts they equal the checkpoint's).
_SCHEDULER_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style",
    "start_wd": "--start-weight-decay", "end_wd": "--end-weight-decay",
    "wd_incr_steps": "--lr-decay-iters", "wd_incr_style": "--weight-decay-incr-style",
}
_SCHEDULER_STEPS = ("lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")  # in samples: iters x global batch


def _reconcile_scheduler(schedule: ScheduleConfig, scheduler: OptimizerParamScheduler, saved: dict,
                         path: str) -> int | None:
    """Turn megatron's scheduler assertion into a one-line message naming the flags.

    The one mismatch that is no mistake: extending a run with a larger ``--train-iters`` while
    ``--lr-decay-iters`` (and a ``--lr-warmup-fraction`` warmup) was left to default from it. Then the
    checkpoint's schedule is kept, as if ``--lr-decay-iters`` had been given, and a note says so; the
    adopted ``--lr-decay-iters`` is returned (``None`` when the flags' schedule stands).
    """
    if schedule.override_opt_param_scheduler or schedule.use_checkpoint_opt_param_scheduler:
        return None
    gbs = schedule.global_batch_size
    derived = {"lr_decay_steps", "wd_incr_steps"} if schedule.lr_decay_iters_derived else set()
    if derived and schedule.lr_warmup_fraction is not None:
        derived.add("lr_warmup_steps")
    diffs, adopted, theirs_flags = [], [], []
    for name, flag in _SCHEDULER_FLAGS.items():
        if name not in saved or getattr(scheduler, name) == saved[name]:
            continue
        ours, theirs = getattr(scheduler, name), saved[name]
        if name in _SCHEDULER_STEPS:
            ours, theirs = ours // gbs, theirs // gbs
        if name in derived:
            setattr(scheduler, name, saved[name])
            adopted.append(f"{flag} {theirs}")
        elif not any(d.startswith(flag + " ") for d in diffs):
            diffs.append(f"{flag} {theirs} in the checkpoint, {ours} here")
            theirs_flags.append(f"{flag} {theirs}")
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} has another LR schedule ({'; '.join(diffs)}): give the checkpoint's values "
            f"({' '.join(theirs_flags)}), or --override-opt_param-scheduler to use this run's, or "
            "--use-checkpoint-opt_param-scheduler")
    if not adopted:
        return None
    print_rank_0(f" > resuming the checkpoint's LR schedule ({', '.join(dict.fromkeys(adopted))}); "
                 "to re-plan it for the new --train-iters add --override-opt_param-scheduler")
    return scheduler.lr_decay_steps // gbs


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Where a (possibly absent) checkpoint puts the run: iteration, data position, and the run's
    configuration (with the checkpoint's ``--lr-decay-iters`` when a resume adopted its schedule)."""

    iteration: int
    consumed_train_samples: int
    run: RunConfig


def load_checkpoint(run: RunConfig | argparse.Namespace, model: list[torch.nn.Module],
                    optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler, config: MoCConfig,
                    settings: ModelSettings, tokenizer_record: TokenizerRecord | None = None) -> tuple[int, int]:
    """Resume from ``--load`` (collective); return ``(iteration, consumed_train_samples)``.

    :func:`load_training_state` for callers that need no updated configuration; given the parsed flags,
    an adopted ``--lr-decay-iters`` is written back to them (as the flags of the resumed run).
    """
    loaded = load_training_state(as_run_config(run), model, optimizer, scheduler, config, settings,
                                 tokenizer_record)
    if isinstance(run, argparse.Namespace):
        run.lr_decay_iters = loaded.run.schedule.lr_decay_iters
    return loaded.iteration, loaded.consumed_train_samples


def load_training_state(run: RunConfig, model: list[torch.nn.Module], optimizer: MegatronOptimizer,
                        scheduler: OptimizerParamScheduler, config: MoCConfig, settings: ModelSettings,
                        tokenizer_record: TokenizerRecord | None = None) -> LoadedCheckpoint:
    """Resume from ``--load`` (collective).

    Iteration and position ``(0, 0)`` when there is nothing to load (see :func:`resolve_load_arg`).
    ``--finetune`` loads only the weights and starts at 0; ``--no-load-optim``/``--no-load-rng`` skip those
    parts. RNG states are skipped (with a note) when the checkpoint was saved at a different parallel
    layout. A checkpoint whose stored tokenizer differs from ``tokenizer_record`` raises
    ``TokenizerMismatchError``.
    """
    ckpt = run.checkpointing
    found = resolve_load_arg(ckpt)
    if found is None:
        if ckpt.load is not None:
            print_rank_0(f" > no checkpoint in {ckpt.load}: starting from scratch")
        return LoadedCheckpoint(0, 0, run)
    path, iteration = found
    common = read_common_state(path)
    mismatches = meta.signature_mismatches(common["model_signature"], meta.model_signature(config, settings))
    if mismatches:
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved for a different model; these settings disagree:\n" + "\n".join(mismatches))
    if tokenizer_record is not None:
        check_same_tokenizer(tokenizer_record, f"this run's --tokenizer-model {run.data.tokenizer_model}",
                             record_from_checkpoint_state(common), f"checkpoint {path}")
    load_optim = common.get("saved_optimizer", False) and not (ckpt.no_load_optim or ckpt.finetune)
    same_layout = common.get("parallel_layout") == parallel_layout()
    load_rng = common.get("saved_rng", False) and same_layout and not (ckpt.no_load_rng or ckpt.finetune)
    if common.get("saved_rng") and not same_layout and not (ckpt.no_load_rng or ckpt.finetune):
        print_rank_0(f" checkpoint parallel layout {common.get('parallel_layout')} differs from this run's "
                     f"{parallel_layout()}: RNG states not restored")
    # The optimizer state loads in the format it was saved in (as Megatron-LM); only the optimizer kind must agree.
    saved_optim = common.get("optimizer_metadata") or {}
    if load_optim and ("distrib_optim_sharding_type" in saved_optim) != bool(run.parallel.use_distributed_optimizer):
        raise CheckpointMismatchError(
            f"checkpoint {path} stored its optimizer as {saved_optim} but this run uses {_optimizer_metadata(run)} "
            "(--use-distributed-optimizer); give the same flag or --no-load-optim")
    if load_optim and saved_optim.get("distrib_optim_sharding_type") == "dp_reshardable" and \
            not _same_model_parallel_layout(common.get("parallel_layout") or {}, parallel_layout()):
        raise CheckpointMismatchError(
            f"checkpoint {path} holds distributed-optimizer state saved at {_layout_name(common['parallel_layout'])} "
            f"(dp_reshardable), which loads only at the same TP/PP/EP/VPP sizes, not at this run's "
            f"{_layout_name(parallel_layout())}: resume with --no-load-optim (fresh optimizer state) or at the saved "
            "layout; checkpoints saved with --dist-ckpt-optim-fully-reshardable load at any layout")
    state = _state_dict(model, optimizer if load_optim else None, scheduler, load_rng, run, is_loading=True,
                        optimizer_metadata=saved_optim if load_optim else None)
    loaded = load_dist_checkpoint(state, path)
    for key, chunk in zip(_model_keys(model), model):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if load_optim:
        # The schedule is checked against the flags first: megatron-core 0.19 matches param groups by
        # their LR too, and would refuse a changed --lr with its own error before ours.
        adopted = _reconcile_scheduler(run.schedule, scheduler, loaded["opt_param_scheduler"], path)
        align_saved_param_groups(optimizer, loaded["optimizer"],
                                 keep_checkpoint_values=run.schedule.use_checkpoint_opt_param_scheduler)
        with torch.no_grad():  # fp32 distributed-optimizer main params are views of the model's
            optimizer.load_state_dict(loaded["optimizer"])
        if run.parallel.use_distributed_optimizer:
            optimizer_state.restore_distributed_optimizer_steps(optimizer, loaded["optimizer"])
        if adopted is not None:
            run = run.replace("schedule", lr_decay_iters=adopted)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()  # the fp32 main weights follow the loaded model weights
        if not ckpt.finetune:
            scheduler.step(increment=common["train_state"]["consumed_train_samples"])
    if load_rng:
        _set_rng_state(loaded["rng_state"][parallel_state.get_data_parallel_rank()])
    dist.barrier()
    if ckpt.finetune:
        print_rank_0(f" loaded weights from {path} (--finetune: starting at iteration 0)")
        return LoadedCheckpoint(0, 0, run)
    print_rank_0(f" loaded checkpoint {path} at iteration {iteration}")
    return LoadedCheckpoint(iteration, common["train_state"]["consumed_train_samples"], run)
