"""Per-rank memory and memory all-to-all bytes of a MoC model at expert-model-parallel sizes 1, 2, 4 (gloo, CPU).

For each EP size the script starts ``torchrun --nproc_per_node=EP`` (world = EP: every rank is an
expert-parallel and a data-parallel rank, as in megatron) on this file. Each rank builds the preset's
model with megatron's DDP and Adam optimizer (fp32, no distributed optimizer), runs one training step on
its own micro-batch and reports:

- bytes of its parameters by kind (routed bank chapters, shared chapters, routers, the rest) and of the
  Adam state (``exp_avg``, ``exp_avg_sq``) that the optimizer holds for each kind;
- the bytes its memory all-to-alls sent to other ranks in that step (forward and backward), as the
  memory layers count them from their dispatch plans (what the training log prints);
- for comparison, what fetching the selected remote chapters to the queries would have sent instead
  (memory tokens forward, their gradients backward, 8-byte requests), from the same routing.

    python bench/bench_expert_parallel.py                       # moc-tiny, seq 256, 8 sequences per rank
    python bench/bench_expert_parallel.py --routing-unit token --ep 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("bank_routed", "bank_shared", "router", "rest")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="moc-tiny")
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="expert-model-parallel sizes to run")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--routing-unit", default=None, choices=["sequence", "chunk", "token"],
                   help="default: the preset's")
    p.add_argument("--chunk-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--num-chapters", type=int, default=None, help="bank chapters incl. shared (default: the preset's)")
    p.add_argument("--chapter-size", type=int, default=None, help="tokens per chapter (default: the preset's)")
    p.add_argument("--top-k", type=int, default=None, help="routed chapters per unit (default: the preset's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # output folder, set for torchrun ranks
    return p.parse_args(argv)


def kind_of(name: str) -> str:
    """Which of :data:`KINDS` a parameter name belongs to."""
    if name.endswith("bank.routed"):
        return "bank_routed"
    if name.endswith("bank.shared"):
        return "bank_shared"
    if ".router." in name:
        return "router"
    return "rest"


def worker(args: argparse.Namespace) -> None:
    """One rank: build, step once, write ``rank{R}.json`` under ``args.worker``."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from moc_megatron import platform
    from moc_megatron.memory.aux_losses import set_aux_loss_scale
    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.model.model_report import padded_vocab_size, preset_config
    from moc_megatron.parallel.bank_group import finalize_model_grads_with_bank
    from moc_megatron.presets import get_preset
    from moc_megatron.training.logging import memory_layers
    from moc_megatron.training.optimizer import build_optimizer

    ep = int(os.environ["WORLD_SIZE"])
    platform.initialize_distributed(expert_model_parallel_size=ep)
    platform.model_parallel_manual_seed(1234)
    rank, ep_rank = dist.get_rank(), ps.get_expert_model_parallel_rank()
    preset = get_preset(args.preset)
    overrides = dict(perform_initialization=True, expert_model_parallel_size=ep, bias_dropout_fusion=False)
    if args.routing_unit:
        overrides["moc_routing_unit"] = args.routing_unit
    for flag, field in (("chunk_size", "moc_chunk_size"), ("num_chapters", "moc_num_chapters"),
                        ("chapter_size", "moc_chapter_size"), ("top_k", "moc_top_k")):
        if getattr(args, flag):
            overrides[field] = getattr(args, flag)
    config = preset_config(preset, **overrides)
    vocab = padded_vocab_size(preset)
    model = MoCGPTModel(config, vocab, args.seq_length, tie_embeddings=preset.tie_embeddings,
                        rotary_base=preset.rotary_base, use_te=False)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = build_optimizer([ddp], OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, bf16=False,
                                                       params_dtype=torch.float32))
    layers = memory_layers([model])

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batch, as data parallelism
    tokens = torch.randint(0, preset.vocab_size, (args.micro_batch, args.seq_length + 1), generator=gen)
    position_ids = torch.arange(args.seq_length).expand(args.micro_batch, -1)
    set_aux_loss_scale(torch.ones(1))
    for layer in layers:
        layer.router.reset_metrics()
        layer.reset_comm_metrics()
    ddp.zero_grad_buffer()
    model.train()
    loss = ddp(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    finalize_model_grads_with_bank([ddp])
    ok, _, _ = optimizer.step()
    assert ok

    params = {k: 0 for k in KINDS}
    by_id = {}
    for name, p in model.named_parameters():
        params[kind_of(name)] += p.numel() * p.element_size()
        by_id[id(p)] = kind_of(name)
    state = {k: 0 for k in KINDS}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for p, entries in opt.optimizer.state.items():
            for value in entries.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[by_id[id(p)]] += value.numel() * value.element_size()

    comm = [layer.compute_comm_metrics() for layer in layers]
    bank = model.memory_bank if model.memory_bank is not None else layers[0].bank
    per_rank, row_bytes = bank.num_local_routed, bank.routed[0].numel() * bank.routed.element_size()
    fetch_fwd = fetch_bwd = 0
    for layer in layers:
        wanted = layer.router.compute_metrics() > 0  # chapters this rank's units selected
        everyone = [torch.zeros_like(wanted) for _ in range(ep)]
        dist.all_gather(everyone, wanted)
        mine = slice(ep_rank * per_rank, (ep_rank + 1) * per_rank)
        remote = int(wanted.sum() - wanted[mine].sum())
        served = sum(int(w[mine].sum()) for r, w in enumerate(everyone) if r != ep_rank)
        fetch_fwd += served * row_bytes + remote * 8  # tokens to the requesters, requests to the owners
        fetch_bwd += remote * row_bytes  # gradients of the fetched tokens back to their owners
    result = dict(
        ep=ep, rank=rank, params=params, state=state, loss=loss.item(),
        a2a_forward=sum(c.forward for c in comm), a2a_backward=sum(c.backward for c in comm),
        fetch_forward=fetch_fwd, fetch_backward=fetch_bwd, memory_layers=len(layers),
        units=layers[0].units.units_per_sequence(args.seq_length) * args.micro_batch if layers else 0,
        tokens=config.moc_chapter_size, bank_dim=config.moc_bank_dim,
        top_k=config.moc_top_k, routing_unit=config.moc_routing_unit, routed=config.moc_num_routed_chapters,
    )
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(result))
    platform.destroy_distributed()


def run(args: argparse.Namespace, ep: int) -> list[dict]:
    """Launch ``ep`` ranks with torchrun and return their results."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ep}",
               __file__, "--worker", out, "--preset", args.preset, "--seq-length", str(args.seq_length),
               "--micro-batch", str(args.micro_batch)]
        if args.routing_unit:
            cmd += ["--routing-unit", args.routing_unit]
        for flag in ("chunk_size", "num_chapters", "chapter_size", "top_k"):
            if getattr(args, flag):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        env = {**os.environ, "MOC_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"EP={ep} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ep)]


def mib(n: float) -> str:
    """Bytes as MiB with three decimals."""
    return f"{n / 2**20:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run every EP size and print the two tables; returns the exit status."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = {ep: run(args, ep) for ep in args.ep}
    first = results[args.ep[0]][0]
    print(f"preset {args.preset}, seq {args.seq_length}, {args.micro_batch} sequences per rank, routing unit "
          f"{first['routing_unit']}, top-{first['top_k']} of {first['routed']} routed chapters of {first['tokens']} "
          f"tokens x {first['bank_dim']}, "
          f"{first['memory_layers']} memory layers, fp32, Adam")
    print("\nper-rank memory (MiB; rank 0; parameters + Adam state)")
    print("| EP | routed bank | its Adam state | shared chapters | routers | rest of the model | rest's Adam state "
          "| total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ep, ranks in results.items():
        r = ranks[0]
        p, s = r["params"], r["state"]
        total = sum(p.values()) + sum(s.values())
        shared = p["bank_shared"] + s["bank_shared"]
        print(f"| {ep} | {mib(p['bank_routed'])} | {mib(s['bank_routed'])} | {mib(shared)} "
              f"| {mib(p['router'] + s['router'])} | {mib(p['rest'])} | {mib(s['rest'])} | {mib(total)} |")
    print("\nmemory all-to-all bytes sent per rank in one training step (MiB; mean over ranks, max in brackets)")
    print("| EP | units per rank | dispatch forward | dispatch backward | dispatch total | fetch-chapters total |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ep, ranks in results.items():
        def stat(key: str, ranks=ranks) -> str:
            values = [sum(r[k] for k in key.split("+")) for r in ranks]
            return f"{mib(sum(values) / len(values))} ({mib(max(values))})"
        print(f"| {ep} | {ranks[0]['units']} | {stat('a2a_forward')} | {stat('a2a_backward')} "
              f"| {stat('a2a_forward+a2a_backward')} | {stat('fetch_forward+fetch_backward')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
