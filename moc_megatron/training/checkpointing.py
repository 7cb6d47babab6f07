"""Save and resume training with megatron-core's ``dist_checkpointing`` (torch_dist format).

A checkpoint holds the model (``model``, or ``model0``, ``model1``, ... per virtual stage), the optimizer,
the LR scheduler, every rank's RNG states, and the common state of :mod:`moc_megatron.checkpoint.metadata`
(iteration, data position, the flags, the model as data and its signature). Model weights are stored as
global tensors, so they load at any TP/PP/EP layout; a checkpoint whose model differs from the flags is
refused with the list of flags that disagree. A resume is planned first (:func:`plan_load`: what to load,
what disagrees, what to say) and then carried out (:func:`carry_out`). See
:mod:`moc_megatron.checkpoint.layout` for the layout and the crash-safe publication of a save. The
optimizer-state adaptations to megatron-core without TE/Apex live in
:mod:`moc_megatron.platform.optimizer_state`.
"""

from __future__ import annotations

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

from moc_megatron.checkpoint.layout import (
    CheckpointError,
    CheckpointNotFoundError,
    checkpoint_path,
    publish_checkpoint,
    resolve_load,
    staging_path,
)
from moc_megatron.checkpoint.metadata import common_state, optimizer_metadata
from moc_megatron.checkpoint.signature import model_signature, signature_mismatches
from moc_megatron.config import MoCConfig
from moc_megatron.data.tokenizer_record import TokenizerRecord, check_same_tokenizer, record_from_checkpoint_state
from moc_megatron.model.builder import ModelSettings
from moc_megatron.platform import optimizer_state, reshardable_optimizer
from moc_megatron.platform.megatron_versions import align_saved_param_groups, load_dist_checkpoint, read_common_state
from moc_megatron.training.fault_injection import maybe_stall_save
from moc_megatron.training.logging import print_rank_0
from moc_megatron.training.run_config import CheckpointConfig, RunConfig, ScheduleConfig
from moc_megatron.training.save_queue import install_save_results_queue, writer_children_die_with_rank


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


def save_checkpoint(run: RunConfig, iteration: int, model: list[torch.nn.Module], optimizer: MegatronOptimizer,
                    scheduler: OptimizerParamScheduler, config: MoCConfig, settings: ModelSettings,
                    consumed_train_samples: int, tokenizer_record: TokenizerRecord | None = None) -> str:
    """Save to ``{--save}/iter_XXXXXXX`` (collective) and then point the tracker at it; return the path.

    ``tokenizer_record`` (the run's tokenizer) is stored under ``"tokenizer"`` in the common state."""
    ckpt = run.checkpointing
    root = ckpt.save
    staging = staging_path(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    state = _state_dict(model, None if ckpt.no_save_optim else optimizer, scheduler, not ckpt.no_save_rng,
                        run, is_loading=False)
    state.update(common_state(
        iteration=iteration, consumed_train_samples=consumed_train_samples, saved_args=run.saved_args,
        config=config, settings=settings, parallel_layout=parallel_layout(), optimizer=_optimizer_metadata(run),
        saved_optimizer=not ckpt.no_save_optim, saved_rng=not ckpt.no_save_rng, tokenizer_record=tokenizer_record))
    install_save_results_queue()
    with writer_children_die_with_rank():
        dist_checkpointing.save(state, staging)
    dist.barrier()
    maybe_stall_save(iteration)
    final = checkpoint_path(root, iteration)
    if dist.get_rank() == 0:
        publish_checkpoint(root, iteration)
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

    See :func:`moc_megatron.checkpoint.layout.resolve_load`; ``--exit-on-missing-checkpoint`` turns "nothing to load"
    into an error.
    """
    if ckpt.load is None:
        return None
    found = resolve_load(ckpt.load, own_save=_same_folder(ckpt.load, ckpt.save))
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


@dataclass(frozen=True)
class LoadPlan:
    """What a resume reads from a checkpoint, decided before anything is read but its common state."""

    path: str
    iteration: int
    """The iteration the run starts at (0 with ``--finetune``)."""
    consumed_train_samples: int
    """The data position the run starts at (0 with ``--finetune``)."""
    saved_consumed_train_samples: int
    """The checkpoint's data position (the LR scheduler is stepped to it when its state is not loaded)."""
    load_optimizer: bool
    load_rng: bool
    optimizer_metadata: dict | None
    """The format the optimizer state was saved in (``None`` when it is not loaded)."""
    weights_only: bool
    """``--finetune``: the weights and nothing else."""
    loaded_note: str
    """The log line once loaded."""
    notes: tuple[str, ...] = ()
    """Log lines before loading: what is skipped and why."""


def plan_load(run: RunConfig, path: str, iteration: int, common: dict, layout: dict, signature: dict,
              tokenizer_record: TokenizerRecord | None = None) -> LoadPlan:
    """Decide what to load from the checkpoint at ``path`` (``common``: its common state) into this run
    (``layout``: its :func:`parallel_layout`, ``signature``: its model signature); no I/O, no collectives.

    Raises :class:`CheckpointMismatchError` for another model or an optimizer state that cannot load here, and
    ``TokenizerMismatchError`` when the checkpoint's tokenizer differs from ``tokenizer_record``.
    ``--finetune`` loads only the weights and starts at 0; ``--no-load-optim``/``--no-load-rng`` skip those
    parts. RNG states are skipped (with a note) when the checkpoint was saved at another parallel layout.
    """
    ckpt = run.checkpointing
    mismatches = signature_mismatches(common["model_signature"], signature)
    if mismatches:
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved for a different model; these settings disagree:\n" + "\n".join(mismatches))
    if tokenizer_record is not None:
        check_same_tokenizer(tokenizer_record, f"this run's --tokenizer-model {run.data.tokenizer_model}",
                             record_from_checkpoint_state(common), f"checkpoint {path}")
    weights_only = ckpt.finetune
    load_optim = common.get("saved_optimizer", False) and not (ckpt.no_load_optim or weights_only)
    want_rng = common.get("saved_rng", False) and not (ckpt.no_load_rng or weights_only)
    saved_layout = common.get("parallel_layout")
    notes = []
    if want_rng and saved_layout != layout:
        notes.append(f" checkpoint parallel layout {saved_layout} differs from this run's {layout}: "
                     "RNG states not restored")
    # The optimizer state loads in the format it was saved in (as Megatron-LM); only the optimizer kind must agree.
    saved_optim = common.get("optimizer_metadata") or {}
    if load_optim and ("distrib_optim_sharding_type" in saved_optim) != bool(run.parallel.use_distributed_optimizer):
        raise CheckpointMismatchError(
            f"checkpoint {path} stored its optimizer as {saved_optim} but this run uses {_optimizer_metadata(run)} "
            "(--use-distributed-optimizer); give the same flag or --no-load-optim")
    if load_optim and saved_optim.get("distrib_optim_sharding_type") == "dp_reshardable" and \
            not _same_model_parallel_layout(saved_layout or {}, layout):
        raise CheckpointMismatchError(
            f"checkpoint {path} holds distributed-optimizer state saved at {_layout_name(saved_layout)} "
            f"(dp_reshardable), which loads only at the same TP/PP/EP/VPP sizes, not at this run's "
            f"{_layout_name(layout)}: resume with --no-load-optim (fresh optimizer state) or at the saved "
            "layout; checkpoints saved with --dist-ckpt-optim-fully-reshardable load at any layout")
    consumed = common["train_state"]["consumed_train_samples"]
    loaded_note = (f" loaded weights from {path} (--finetune: starting at iteration 0)" if weights_only
                   else f" loaded checkpoint {path} at iteration {iteration}")
    return LoadPlan(path=path, iteration=0 if weights_only else iteration,
                    consumed_train_samples=0 if weights_only else consumed, saved_consumed_train_samples=consumed,
                    load_optimizer=load_optim, load_rng=want_rng and saved_layout == layout,
                    optimizer_metadata=saved_optim if load_optim else None, weights_only=weights_only,
                    loaded_note=loaded_note, notes=tuple(notes))


def load_training_state(run: RunConfig, model: list[torch.nn.Module], optimizer: MegatronOptimizer,
                        scheduler: OptimizerParamScheduler, config: MoCConfig, settings: ModelSettings,
                        tokenizer_record: TokenizerRecord | None = None) -> LoadedCheckpoint:
    """Resume from ``--load`` (collective): :func:`plan_load`, then :func:`carry_out`.

    Iteration and position ``(0, 0)`` when there is nothing to load (see :func:`resolve_load_arg`).
    """
    found = resolve_load_arg(run.checkpointing)
    if found is None:
        if run.checkpointing.load is not None:
            print_rank_0(f" > no checkpoint in {run.checkpointing.load}: starting from scratch")
        return LoadedCheckpoint(0, 0, run)
    path, iteration = found
    plan = plan_load(run, path, iteration, read_common_state(path), parallel_layout(),
                     model_signature(config, settings), tokenizer_record)
    return carry_out(plan, run, model, optimizer, scheduler)


def carry_out(plan: LoadPlan, run: RunConfig, model: list[torch.nn.Module], optimizer: MegatronOptimizer,
              scheduler: OptimizerParamScheduler) -> LoadedCheckpoint:
    """Load what ``plan`` says into the model, optimizer, scheduler and RNGs (collective)."""
    for note in plan.notes:
        print_rank_0(note)
    state = _state_dict(model, optimizer if plan.load_optimizer else None, scheduler, plan.load_rng, run,
                        is_loading=True, optimizer_metadata=plan.optimizer_metadata)
    loaded = load_dist_checkpoint(state, plan.path)
    for key, chunk in zip(_model_keys(model), model):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if plan.load_optimizer:
        # The schedule is checked against the flags first: megatron-core 0.19 matches param groups by
        # their LR too, and would refuse a changed --lr with its own error before ours.
        adopted = _reconcile_scheduler(run.schedule, scheduler, loaded["opt_param_scheduler"], plan.path)
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
        if not plan.weights_only:
            scheduler.step(increment=plan.saved_consumed_train_samples)
    if plan.load_rng:
        _set_rng_state(loaded["rng_state"][parallel_state.get_data_parallel_rank()])
    dist.barrier()
    print_rank_0(plan.loaded_note)
    return LoadedCheckpoint(plan.iteration, plan.consumed_train_samples, run)
