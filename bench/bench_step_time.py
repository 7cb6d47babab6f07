"""Training step time of ``moc-tiny`` against a dense model of (nearly) equal FLOPs, one process, CPU, fp32.

The dense model has moc-tiny's width and no memory; its layer count is the integer whose forward+backward
FLOPs per sequence (``moc_megatron/model/flops.py``) come closest to moc-tiny's. A step is forward,
backward and ``torch.optim.AdamW`` (foreach) step over one micro-batch; the two models alternate step by
step (the first of each pair alternates too) so both see the same machine load. Dropout is off in both.

    python bench/bench_step_time.py
    python bench/bench_step_time.py --batch 8 --steps 40 --profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from _timing import time_interleaved

if TYPE_CHECKING:
    from moc_megatron.config import MoCConfig
    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.presets import Preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="moc-tiny")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's (256 for moc-tiny)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the MoC step")
    return p.parse_args(argv)


def dense_layers_for_equal_flops(config: MoCConfig, vocab_size: int, seq_length: int) -> tuple[int, int, int]:
    """``(layers, dense fwd+bwd FLOPs, MoC fwd+bwd FLOPs)``: the dense depth closest in FLOPs to ``config``."""
    from moc_megatron.model.flops import estimate_flops

    target = estimate_flops(config, vocab_size, seq_length).forward_backward

    def dense(n: int) -> int:
        return estimate_flops(_dense_config(config, n), vocab_size, seq_length).forward_backward

    n = 1
    while dense(n + 1) <= target:
        n += 1
    best = min((n, n + 1), key=lambda k: abs(dense(k) - target))
    return best, dense(best), target


def _dense_config(config: MoCConfig, num_layers: int) -> MoCConfig:
    """``config`` without memory, with ``num_layers`` layers."""
    import dataclasses

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(num_layers=num_layers, moc_memory_layers=[])
    return type(config)(**fields)


def build(config: MoCConfig, preset: Preset, seq_length: int) -> MoCGPTModel:
    """A real (initialised) CPU model for ``config``."""
    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.model.model_report import padded_vocab_size

    return MoCGPTModel(config, padded_vocab_size(preset), seq_length, tie_embeddings=preset.tie_embeddings,
                       rotary_base=preset.rotary_base, use_te=False).train()


def make_step(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """A closure running one training step (zero_grad, forward, backward, AdamW step); returns the loss."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from moc_megatron.memory.aux_losses import pop_chapter_load

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, position_ids, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        pop_chapter_load(model)
        clear_aux_losses_tracker()
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moc_megatron import platform
    from moc_megatron.model.model_report import padded_vocab_size, preset_config
    from moc_megatron.presets import get_preset

    platform.initialize_distributed()
    platform.model_parallel_manual_seed(1234)
    preset = get_preset(args.preset)
    seq = args.seq_length or preset.seq_length
    vocab = padded_vocab_size(preset)
    moc_config = preset_config(preset, perform_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               params_dtype=torch.float32)
    layers, dense_flops, moc_flops = dense_layers_for_equal_flops(moc_config, vocab, seq)
    dense_config = _dense_config(moc_config, layers)

    moc = build(moc_config, preset, seq)
    dense = build(dense_config, preset, seq)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, preset.vocab_size, (args.batch, seq), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    steps = {"moc": make_step(moc, tokens, labels), "dense": make_step(dense, tokens, labels)}
    times = time_interleaved(steps, args.warmup, args.steps)

    wall = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    flop_ratio = moc_flops / dense_flops
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("moc", moc), ("dense", dense))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; optimizer torch.optim.AdamW "
          f"(foreach); batch {args.batch} x seq {seq}")
    print(f"moc   ({args.preset}, {moc_config.num_layers} layers, memory {moc_config.moc_memory_layers}): "
          f"{params['moc']:,} params, fwd+bwd {moc_flops:,} FLOPs/sequence")
    print(f"dense ({layers} layers, width {dense_config.hidden_size}): {params['dense']:,} params, "
          f"fwd+bwd {dense_flops:,} FLOPs/sequence")
    for name, t in times.items():
        print(f"{name:>6}: median step {wall[name]:8.2f} ms wall (min {min(t['wall']):.2f}, max {max(t['wall']):.2f}), "
              f"median {cpu[name]:8.2f} ms process CPU; {args.steps} steps after {args.warmup} warmup")
    for kind, med in (("wall-clock", wall), ("CPU time", cpu)):
        ratio = med["moc"] / med["dense"]
        print(f"{kind}: FLOP ratio (moc / dense) {flop_ratio:.3f}, time ratio {ratio:.3f}, "
              f"time ratio / FLOP ratio {ratio / flop_ratio:.3f} (target <= 1.2)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps["moc"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
