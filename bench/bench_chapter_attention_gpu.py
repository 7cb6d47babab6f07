"""GPU benchmark of the chapter attention alone (no megatron-core needed): triton vs blocked vs gather.

The paper's shapes: width 768 = 12 heads x 64, chapters of T = 64 tokens, k = 64 routed + 1 shared chapter
per unit, 32 x 1024 tokens per micro-batch, 4,097 chapters (K/V of every chapter with traffic given), for
sequence, chunk (64-token chunks) and token routing, paper gating. Reports forward+backward time (CUDA
events, median of ``--iters`` after ``--warmup``), TFLOP/s by the paper's attention FLOP rule
(``4 x tokens x N_sel x width`` forward, backward 2 x forward, ``N_sel = 65 x 64``) and the peak of
``torch.cuda.max_memory_allocated`` above the inputs. ``gather`` is skipped where its per-unit K/V copy
alone passes ``--max-gather-gib``.

    PYTHONPATH=. python bench/bench_chapter_attention_gpu.py --dtype bfloat16 --json gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moc_megatron.memory.chapter_attention import chapter_attention

UNITS = {"sequence": 1024, "chunk": 64, "token": 1}
"""Queries per unit at sequence length 1024."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", nargs="+", default=list(UNITS), choices=list(UNITS))
    p.add_argument("--impls", nargs="+", default=["triton", "blocked", "gather"],
                   choices=["triton", "blocked", "gather"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=32 * 1024)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chapters", type=int, default=4097)
    p.add_argument("--chapter-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64, help="routed chapters per unit (plus one shared)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--max-gather-gib", type=float, default=40.0)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script on tiny shapes")
    return p.parse_args(argv)


def make_problem(unit: str, args: argparse.Namespace, dtype: torch.dtype):
    """Queries, K/V of all chapters, and each unit's shared chapter 0 plus ``top_k`` distinct routed ones."""
    u = UNITS[unit]
    n = args.tokens // u
    gen = torch.Generator(device=args.device).manual_seed(0)
    q = torch.randn(n, u, args.heads, args.head_dim, device=args.device, dtype=dtype, generator=gen)
    kv_shape = (args.chapters, args.chapter_size, args.kv_heads, args.head_dim)
    keys = torch.randn(kv_shape, device=args.device, dtype=dtype, generator=gen)
    values = torch.randn(kv_shape, device=args.device, dtype=dtype, generator=gen)
    scores = torch.rand(n, args.chapters - 1, device=args.device, generator=gen)
    routed = scores.topk(args.top_k, dim=-1).indices + 1
    selected = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=args.device), routed], dim=1)
    weights = torch.softmax(torch.randn(n, args.top_k + 1, device=args.device, generator=gen), -1).to(dtype)
    return q, keys, values, selected, weights


def run(impl: str, problem, scale: float, args: argparse.Namespace) -> dict:
    """Time and peak memory of forward+backward (the loss reads the output)."""
    q, keys, values, selected, weights = (x.requires_grad_(x.is_floating_point()) for x in problem)
    probe = torch.randn_like(q)

    def step() -> None:
        out, _ = chapter_attention(q, keys, values, selected, weights, "paper", scale, impl=impl)
        torch.autograd.backward(out, probe)
        for x in (q, keys, values, weights):
            x.grad = None

    cuda = q.is_cuda
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    """Run every (routing unit, implementation) and print a table."""
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    n_sel = (args.top_k + 1) * args.chapter_size
    width = args.heads * args.head_dim
    flops = 3 * 4 * args.tokens * n_sel * width
    rows = []
    for unit in args.units:
        problem = make_problem(unit, args, dtype)
        n = problem[0].shape[0]
        copy_gib = 2 * n * (args.top_k + 1) * args.chapter_size * args.kv_heads * args.head_dim * dtype.itemsize / 2**30
        for impl in args.impls:
            row = {"unit": unit, "impl": impl}
            if impl == "gather" and copy_gib > args.max_gather_gib:
                row["skipped"] = f"K/V copy alone {copy_gib:.0f} GiB"
            else:
                try:
                    row.update(run(impl, problem, args.head_dim ** -0.5, args))
                    row["tflops"] = flops / row["median_s"] / 1e12
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{device}, torch {torch.__version__}, {args.dtype}, {args.tokens} tokens, "
          f"{args.heads} heads x {args.head_dim}, k = {args.top_k} + 1 shared, T = {args.chapter_size}")
    print("| routing | impl | fwd+bwd (ms) | attention TFLOP/s | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "median_s" in r:
            print(f"| {r['unit']} | {r['impl']} | {r['median_s'] * 1e3:.1f} | {r['tflops']:.1f} | "
                  f"{r['peak_bytes'] / 2**30:.2f} |")
        else:
            print(f"| {r['unit']} | {r['impl']} | {r['skipped']} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
