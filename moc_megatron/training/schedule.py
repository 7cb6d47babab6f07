"""Learning-rate and weight-decay schedule: megatron-core's ``OptimizerParamScheduler``.

As in Megatron-LM the scheduler counts samples: it advances by the global batch size every step, so
``--lr-warmup-iters``/``--lr-decay-iters``/``--lr-wsd-decay-iters`` are multiplied by the global batch
size. Each param group decays from its own ``max_lr`` to its own ``min_lr`` (memory and bank groups).
"""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from moc_megatron.training.run_config import ScheduleConfig


def build_scheduler(schedule: ScheduleConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """The scheduler for ``--lr-decay-style`` (constant, linear, cosine, inverse-square-root, WSD)."""
    gbs = schedule.global_batch_size
    wsd_steps = schedule.lr_wsd_decay_iters * gbs if schedule.lr_wsd_decay_iters is not None else None
    return OptimizerParamScheduler(
        optimizer,
        init_lr=schedule.lr_warmup_init,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.lr_warmup_iters * gbs,
        lr_decay_steps=schedule.lr_decay_iters * gbs,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=schedule.start_weight_decay,
        end_wd=schedule.end_weight_decay,
        wd_incr_steps=schedule.lr_decay_iters * gbs,  # Megatron-LM: train_iters; this lets --train-iters grow on resume
        wd_incr_style=schedule.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=schedule.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=schedule.override_opt_param_scheduler,
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=schedule.lr_wsd_decay_style,
    )


def scheduler_step(scheduler: OptimizerParamScheduler, schedule: ScheduleConfig) -> None:
    """Advance the schedule by one iteration (one global batch of samples)."""
    scheduler.step(increment=schedule.global_batch_size)
