"""Megatron-style log lines and TensorBoard scalars, router aux losses and chapter-load statistics.

The reductions here are collective (every rank calls them at the same iterations); printing and the
TensorBoard writer live on the last rank, as in Megatron-LM (it holds the last pipeline stage's loss).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from datetime import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moc_megatron import platform
from moc_megatron.config import MoCConfig
from moc_megatron.memory.aux_losses import (
    LOAD_BALANCE_NAME,
    Z_LOSS_NAME,
    chapter_load_statistics,
    pop_chapter_load,
)
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.platform.megatron_versions import aux_loss_values, forget_aux_losses
from moc_megatron.training.run_config import RunConfig


def is_last_rank() -> bool:
    """The rank that prints and writes TensorBoard (Megatron-LM's ``print_rank_last``)."""
    return dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Print on the last rank only."""
    if is_last_rank():
        print(message, flush=True)


def print_rank_0(message: str) -> None:
    """Print on rank 0 only."""
    if dist.get_rank() == 0:
        print(message, flush=True)


def _sum_over_pp_and_dp(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


def memory_layers(model: Sequence[torch.nn.Module]) -> list[MoCMemoryAttention]:
    """The memory-read modules of every local model chunk (wrappers included), in module order."""
    return [m for chunk in model for m in chunk.modules() if isinstance(m, MoCMemoryAttention)]


def reset_memory_statistics(model: Sequence[torch.nn.Module] | None = None) -> None:
    """Forget router losses (megatron's process-wide aux-loss tracker) and, with ``model`` (the local model
    chunks), its memory layers' chapter loads and all-to-all bytes recorded so far."""
    for layer in memory_layers(model or []):
        layer.router.reset_metrics()
        layer.reset_comm_metrics()
    forget_aux_losses((LOAD_BALANCE_NAME, Z_LOSS_NAME))


def reduce_memory_aux_losses(config: MoCConfig, num_microbatches: int) -> dict[str, float]:
    """This iteration's router losses (unscaled, averaged over memory layers, micro-batches and DP ranks).

    Reads and clears megatron's aux-loss tracker, where the memory layers record them.
    """
    if not config.has_memory:
        return {}
    out = {}
    for name, coeff in ((LOAD_BALANCE_NAME, config.moc_load_balance_coeff), (Z_LOSS_NAME, config.moc_z_loss_coeff)):
        if coeff <= 0:
            continue
        recorded = aux_loss_values(name)
        values = torch.zeros(config.num_layers, device=platform.get_device())
        if recorded is not None:
            values += recorded.to(values.device)
            recorded.zero_()
        _sum_over_pp_and_dp(values)
        dp = parallel_state.get_data_parallel_world_size()
        out[name] = values.sum().item() / (len(config.moc_memory_layers) * num_microbatches * dp)
    return out


def reduce_chapter_load(config: MoCConfig, model: Sequence[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """Chapter selection counts per memory layer (0-based layer index) since the last call, all ranks.

    Gathered from the routers of ``model``'s memory layers and reset.
    """
    if not config.has_memory:
        return {}
    layers = sorted(config.moc_memory_layers)
    counts = torch.zeros(len(layers), config.moc_num_routed_chapters, dtype=torch.float64,
                         device=platform.get_device())
    for layer_number, loads in pop_chapter_load(model).items():
        counts[layers.index(layer_number - 1)] += loads.to(counts.device)
    _sum_over_pp_and_dp(counts)
    return {layer: counts[i].cpu() for i, layer in enumerate(layers)}


def reduce_memory_comm(model: Sequence[torch.nn.Module]) -> dict[str, float]:
    """Bytes the memory all-to-alls sent since the last call (forward, backward), over all ranks; resets them.

    Counted by each memory layer from its dispatch plans (no extra communication during the steps); this
    reduction is one all-reduce and one max-reduce over the world. Returns ``forward``/``backward`` summed
    over the ranks that hold memory layers, ``ranks`` (how many do) and ``max_rank`` (the largest total one
    rank sent).
    """
    local = torch.zeros(3, dtype=torch.float64, device=platform.get_device())
    layers = memory_layers(model)
    for layer in layers:
        comm = layer.compute_comm_metrics(reset=True)
        local[0] += comm.forward
        local[1] += comm.backward
    local[2] = float(bool(layers))
    peak = local[:2].sum().reshape(1)
    dist.all_reduce(local)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    forward, backward, ranks = local.tolist()
    return {"forward": forward, "backward": backward, "ranks": ranks, "max_rank": float(peak.item())}


def _histogram_by_chapter(writer, tag: str, counts: torch.Tensor, iteration: int) -> None:
    """Load per chapter as a TensorBoard histogram: one bucket per chapter, its height the load."""
    index = torch.arange(len(counts), dtype=torch.float64)
    total = float(counts.sum())
    if total <= 0:
        return
    writer.add_histogram_raw(
        tag, min=0.0, max=float(len(counts) - 1), num=total, sum=float((index * counts).sum()),
        sum_squares=float((index * index * counts).sum()), bucket_limits=(index + 0.5).tolist(),
        bucket_counts=counts.tolist(), global_step=iteration)


def tensorboard_note(tensorboard_dir: str | None, start_iteration: int) -> str | None:
    """The line that says a run writes into a ``--tensorboard-dir`` already holding event files (else ``None``).

    A resumed run adds its iterations after the earlier ones (one curve goes on); a run from iteration 0
    draws over the earlier run's curves, which is rarely meant. Call before the run's writer exists.
    """
    if not tensorboard_dir or not os.path.isdir(tensorboard_dir):
        return None
    events = [f for f in os.listdir(tensorboard_dir) if f.startswith("events.out.tfevents")]
    if not events:
        return None
    if start_iteration > 0:
        return (f" > TensorBoard: {tensorboard_dir} holds {len(events)} earlier event file(s); this run appends "
                f"iterations {start_iteration + 1}.. to the same curves (another --tensorboard-dir keeps it apart)")
    return (f" > TensorBoard: {tensorboard_dir} holds {len(events)} event file(s) of an earlier run; this run starts "
            "at iteration 1 and draws over its curves: give another --tensorboard-dir to keep them apart")


class TrainingLogger:
    """Accumulates per-iteration values and emits the log line every ``--log-interval`` iterations."""

    def __init__(self, run: RunConfig, config: MoCConfig,
                 model: Sequence[torch.nn.Module] | None = None) -> None:
        self.run = run
        self.config = config
        self.model = model
        """The local model chunks whose memory layers hold the router and all-to-all statistics."""
        self.writer = None
        log = run.logging
        if log.tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log.tensorboard_dir, max_queue=log.log_interval)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.iterations = 0
        self.skipped = 0
        self.nan = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation, saving) out of the iteration time."""
        self.excluded += seconds

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        """Write one TensorBoard scalar (last rank only)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)

    def training_iteration(self, iteration: int, consumed_samples: int, losses: dict[str, float],
                           aux_losses: dict[str, float], grad_norm: float | None, learning_rates: dict[str, float],
                           update_successful: bool, loss_scale: float) -> None:
        """Record one iteration (every rank calls this); prints and reduces chapter load at the interval."""
        self.iterations += 1
        self.skipped += 0 if update_successful else 1
        values = {**losses, **aux_losses}
        self.nan += int(not all(math.isfinite(v) for v in values.values()))
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in values.items():
            self.scalar(key, value, iteration)
        for role, lr in learning_rates.items():
            self.scalar("learning-rate" if role == "backbone" else f"learning-rate/{role}", lr, iteration)
        if grad_norm is not None:
            self.scalar("grad-norm", grad_norm, iteration)
        self.scalar("loss-scale", loss_scale, iteration)
        if iteration % self.run.logging.log_interval:
            return
        loads = reduce_chapter_load(self.config, self.model)
        self._write_chapter_load(loads, iteration)
        comm = self._memory_comm(iteration)
        self._print_line(iteration, consumed_samples, grad_norm, learning_rates["backbone"], loss_scale, comm)
        self._reset()

    def _memory_comm(self, iteration: int) -> str:
        """Per-step all-to-all bytes of the memory layers (expert parallelism only): TensorBoard and log text."""
        if self.model is None or not self.config.has_memory or self.config.expert_model_parallel_size == 1:
            return ""
        comm = reduce_memory_comm(self.model)
        steps, ranks = max(self.iterations, 1), max(comm["ranks"], 1.0)
        forward, backward = comm["forward"] / steps / ranks, comm["backward"] / steps / ranks
        peak = comm["max_rank"] / steps
        self.scalar("moc/memory_a2a_bytes_per_rank", forward + backward, iteration)
        self.scalar("moc/memory_a2a_forward_bytes_per_rank", forward, iteration)
        self.scalar("moc/memory_a2a_backward_bytes_per_rank", backward, iteration)
        self.scalar("moc/memory_a2a_max_bytes_per_rank", peak, iteration)
        return f" memory all-to-all MB per rank: {(forward + backward) / 1e6:.3f} (max {peak / 1e6:.3f}) |"

    def _write_chapter_load(self, loads: dict[int, torch.Tensor], iteration: int) -> None:
        if self.writer is None:
            return
        for layer, counts in loads.items():
            stats = chapter_load_statistics(counts)
            _histogram_by_chapter(self.writer, f"moc/layer_{layer}/chapter_load", counts, iteration)
            self.scalar(f"moc/layer_{layer}/chapter_load_entropy", stats["entropy"], iteration)
            self.scalar(f"moc/layer_{layer}/chapter_load_normalized_entropy", stats["normalized_entropy"], iteration)
            self.scalar(f"moc/layer_{layer}/unused_chapter_fraction", stats["unused_fraction"], iteration)
            self.scalar(f"moc/layer_{layer}/max_chapter_load", stats["max_load"], iteration)

    def _print_line(self, iteration: int, consumed_samples: int, grad_norm: float | None, lr: float,
                    loss_scale: float, memory_comm: str = "") -> None:
        schedule = self.run.schedule
        elapsed = (time.perf_counter() - self.start - self.excluded) / max(self.iterations, 1)
        tokens_per_second = schedule.global_batch_size * self.run.data.seq_length / elapsed
        self.scalar("iteration-time", elapsed, iteration)
        self.scalar("tokens-per-second", tokens_per_second, iteration)
        line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]"
        line += f" iteration {iteration:8d}/{schedule.train_iters:8d} |"
        line += f" consumed samples: {consumed_samples:12d} |"
        line += f" elapsed time per iteration (ms): {elapsed * 1000.0:.1f} |"
        line += f" tokens per second: {tokens_per_second:.1f} |"
        line += f" learning rate: {lr:.6E} |"
        line += f" global batch size: {schedule.global_batch_size:5d} |"
        for key, total in self.sums.items():
            line += f" {key}: {total / max(self.iterations, 1):.6E} |"
        line += memory_comm
        line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        line += f" number of skipped iterations: {self.skipped:3d} |"
        line += f" number of nan iterations: {self.nan:3d} |"
        print_rank_last(line)

    def validation(self, iteration: int, losses: dict[str, float], name: str = "validation") -> None:
        """Print and record an evaluation result (Megatron-LM's format)."""
        if not losses:
            return
        parts = []
        for key, value in losses.items():
            ppl = math.exp(min(20.0, value))
            parts.append(f"{key} value: {value:.6E} | {key} PPL: {ppl:.6E} |")
            self.scalar(f"{key} {name}", value, iteration)
            self.scalar(f"{key} {name} ppl", ppl, iteration)
        text = f" {name} loss at iteration {iteration} | " + " ".join(parts)
        bar = "-" * len(text)
        print_rank_last(f"{bar}\n{text}\n{bar}")

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
