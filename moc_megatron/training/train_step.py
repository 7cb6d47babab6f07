"""One training step and one evaluation pass, through megatron-core's pipeline schedules."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from moc_megatron.memory.aux_losses import set_aux_loss_scale
from moc_megatron.training.data import get_batch, needs_document_ids
from moc_megatron.training.nan_check import local_losses_nonfinite, on_any_rank
from moc_megatron.training.run_config import RunConfig, ScheduleConfig
from moc_megatron.training.schedule import scheduler_step

LM_LOSS = "lm loss"


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token loss in megatron's 3-tuple form ``(loss sum, tokens, {name: [sum, tokens]})``.

    The schedule divides the sum by the token count and the number of micro-batches; the reported pair
    lets the step average over all tokens of the global batch.
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss_sum.detach().view(1), num_tokens.detach().float().view(1)])
    return loss_sum, num_tokens, {LM_LOSS: report}


def forward_step(data_iterator, model: torch.nn.Module):
    """megatron ``forward_step_func``: run one micro-batch through one model chunk."""
    pre_process = get_attr_wrapped_model(model, "pre_process")
    post_process = get_attr_wrapped_model(model, "post_process")
    documents = needs_document_ids(get_attr_wrapped_model(model, "config"))
    batch = get_batch(data_iterator, pre_process, post_process, documents)
    output = model(
        batch.get("tokens") if pre_process else None,
        batch.get("position_ids") if pre_process else None,
        None,
        labels=batch.get("labels") if post_process else None,
        document_ids=batch.get("document_ids"),
    )
    return output, partial(loss_func, batch.get("loss_mask"))


def reduce_losses(losses: list[dict]) -> dict[str, float]:
    """Token-weighted averages over micro-batches and data-parallel ranks (empty off the last stage)."""
    if not losses or not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    out = {}
    for key in losses[0]:
        total = torch.stack([x[key] for x in losses]).sum(dim=0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        out[key] = (total[0] / total[1].clamp(min=1)).item()
    return out


@dataclass
class StepResult:
    """What one training step reports."""

    losses: dict[str, float]
    grad_norm: float | None
    update_successful: bool
    num_zeros_in_grad: int | None
    nonfinite_loss: bool = False
    """The loss was NaN/Inf on some rank: the optimizer step was not taken."""


def _run_schedule(schedule: ScheduleConfig, seq_length: int, data_iterators: list, model: list[torch.nn.Module],
                  forward_step_func, forward_only: bool) -> list[dict]:
    """One global batch through megatron's pipeline schedule; the per-micro-batch loss dicts."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators,
        model=model,
        num_microbatches=schedule.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=schedule.micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def train_step(run: RunConfig, data_iterators: list, model: list[torch.nn.Module],
               optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
               forward_step_func=forward_step) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, gradient finalisation, optimizer step.

    ``forward_step_func`` is megatron's forward step (default :func:`forward_step`; SFT passes its own).
    """
    schedule = run.schedule
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    config = get_model_config(model[0])
    # megatron's schedules scale MoE aux-loss gradients only when num_moe_experts is set; do it for the
    # router losses of the memory, exactly as they would: loss scale / number of micro-batches.
    loss_scale = config.grad_scale_func(torch.ones(1)) if config.grad_scale_func is not None else torch.ones(1)
    set_aux_loss_scale(loss_scale / schedule.num_microbatches)
    losses = _run_schedule(schedule, run.data.seq_length, data_iterators, model, forward_step_func,
                           forward_only=False)
    if schedule.check_for_nan_in_loss_and_grad and on_any_rank(local_losses_nonfinite(losses)):
        return StepResult(reduce_losses(losses), None, False, None, nonfinite_loss=True)
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler_step(scheduler, schedule)
    return StepResult(reduce_losses(losses), grad_norm, bool(update_successful), num_zeros)


def evaluate(run: RunConfig, data_iterators: list, model: list[torch.nn.Module],
             forward_step_func=forward_step) -> dict[str, float]:
    """Forward-only loss over ``--eval-iters`` global batches (on the last stage; ``{}`` elsewhere)."""
    for chunk in model:
        chunk.eval()
    collected: list[dict] = []
    with torch.no_grad():
        for _ in range(run.logging.eval_iters):
            collected += _run_schedule(run.schedule, run.data.seq_length, data_iterators, model, forward_step_func,
                                       forward_only=True)
    for chunk in model:
        chunk.train()
    return reduce_losses(collected)
