"""Peak memory and time of one memory layer forward+backward, per chapter-attention implementation and routing unit.

Every measurement runs in its own fresh process (``--child``), so one implementation's allocations never
count against another's. On a CPU the peak is the rise of the process's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the layer and its inputs exist) during the first
forward+backward; on a GPU it is ``torch.cuda.max_memory_allocated`` above what was allocated before. Time is
the median of ``--iters`` further forward+backward calls. Cases:

- ``issue``: width 768, 12 memory heads, 1,025 chapters x 64 tokens (1 shared), top-64, 2 x 1024 tokens,
  sequence routing; chunk routing (64-token chunks); token routing at top-8 with 1 x 256 tokens;
- ``large``: where ``gather`` does not fit the machine: token routing at top-64 with 2 x 1024 tokens and chunk
  routing with 8 x 1024 tokens. ``gather`` is not run there unless ``--allow-huge`` (its per-unit K/V copy
  alone is printed);
- ``paper``: the paper's micro-batch, 32 x 1024 tokens, 4,097 chapters, top-64, each routing unit (for a GPU).

    python bench/bench_memory_read.py --cases issue large --impls gather blocked
    python bench/bench_memory_read.py --device cuda --cases paper --impls gather blocked triton

TFLOP/s counts the attention matmuls by the paper's rule (``4 x tokens x N_sel x width`` forward, backward
2 x forward; ``N_sel = (S + k) T``), i.e. the useful work of the read, not projections or the router.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "issue": [
        dict(name="sequence", unit="sequence", batch=2, seq=1024, top_k=64, chapters=1025),
        dict(name="chunk-64", unit="chunk", batch=2, seq=1024, top_k=64, chapters=1025),
        dict(name="token top-8", unit="token", batch=1, seq=256, top_k=8, chapters=1025),
    ],
    "large": [
        dict(name="token top-64", unit="token", batch=2, seq=1024, top_k=64, chapters=1025),
        dict(name="chunk-64 8x1024", unit="chunk", batch=8, seq=1024, top_k=64, chapters=1025),
    ],
    "paper": [
        dict(name="paper sequence", unit="sequence", batch=32, seq=1024, top_k=64, chapters=4097),
        dict(name="paper chunk-64", unit="chunk", batch=32, seq=1024, top_k=64, chapters=4097),
        dict(name="paper token", unit="token", batch=32, seq=1024, top_k=64, chapters=4097),
    ],
}
HUGE_BYTES = 6 << 30
"""``gather`` is skipped where its per-unit K/V copies alone pass this (unless ``--allow-huge``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["issue"], choices=list(CASES))
    p.add_argument("--impls", nargs="+", default=["gather", "blocked"], choices=["gather", "blocked", "triton"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--chapter-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="timed forward+backward calls after the measured first one")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--allow-huge", action="store_true", help="run gather even where its copies pass 6 GiB")
    p.add_argument("--scope", default="layer", choices=["layer", "read"],
                   help="layer: the whole memory layer (router, K/V projection of the chapters with traffic, read, "
                        "W_O); read: chapter_attention alone, given the queries and the K/V of the chapters with "
                        "traffic (as the layer's local read calls it)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def gather_copy_bytes(case: dict, args: argparse.Namespace) -> int:
    """Bytes of gather's per-unit selected keys + values (one copy each; it keeps weighted copies too)."""
    tokens = case["batch"] * case["seq"]
    units = {"sequence": case["batch"], "chunk": tokens // args.chunk_size, "token": tokens}[case["unit"]]
    width = 4 if args.dtype == "float32" else 2
    return 2 * units * (1 + case["top_k"]) * args.chapter_size * args.hidden * width


def attention_flops(case: dict, args: argparse.Namespace) -> int:
    """Forward+backward attention-matmul FLOPs by the paper's rule."""
    n_sel = (1 + case["top_k"]) * args.chapter_size
    return 3 * 4 * case["batch"] * case["seq"] * n_sel * args.hidden


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _read_step(spec: dict, device, dtype):
    """``chapter_attention`` alone: every unit reads chapter 0 (shared) and ``top_k`` random routed chapters."""
    import torch

    from moc_megatron.memory.chapter_attention import chapter_attention

    tokens = spec["batch"] * spec["seq"]
    u = {"sequence": spec["seq"], "chunk": spec["chunk_size"], "token": 1}[spec["unit"]]
    n, h, t = tokens // u, spec["heads"], spec["chapter_size"]
    e = spec["hidden"] // h
    gen = torch.Generator().manual_seed(0)
    routed = torch.rand(n, spec["chapters"] - 1, generator=gen).topk(spec["top_k"], dim=-1).indices + 1
    chosen = torch.cat([torch.zeros(n, 1, dtype=torch.long), routed], dim=1)
    used, selected = torch.unique(chosen, return_inverse=True)
    q = torch.randn(n, u, h, e, generator=gen).to(device, dtype).requires_grad_(True)
    keys = torch.randn(used.numel(), t, h, e, generator=gen).to(device, dtype).requires_grad_(True)
    values = torch.randn(used.numel(), t, h, e, generator=gen).to(device, dtype).requires_grad_(True)
    weights = torch.softmax(torch.randn(n, spec["top_k"] + 1, generator=gen), -1).to(device, dtype).requires_grad_(True)
    selected = selected.to(device)
    probe = torch.randn(q.shape, generator=gen).to(device, dtype)

    def step() -> None:
        for x in (q, keys, values, weights):
            x.grad = None
        out, _ = chapter_attention(q, keys, values, selected, weights, "paper", e ** -0.5, need_lse=False,
                                   impl=spec["impl"])
        (out * probe).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def run_child(spec: dict) -> dict:
    """One implementation on one case: peak memory of the first forward+backward, then timed repetitions."""
    import torch

    from moc_megatron.config import MoCConfig
    from moc_megatron.memory.memory_attention import MoCMemoryAttention
    from moc_megatron.platform import initialize_distributed

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    initialize_distributed()
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    if spec.get("scope") == "read":
        return _measure(_read_step(spec, device, dtype), device, spec["iters"])
    config = MoCConfig(
        num_layers=1, hidden_size=spec["hidden"], num_attention_heads=spec["heads"], moc_memory_layers=[0],
        moc_num_chapters=spec["chapters"], moc_chapter_size=spec["chapter_size"], moc_num_shared_chapters=1,
        moc_top_k=spec["top_k"], moc_routing_unit=spec["unit"], moc_chunk_size=spec["chunk_size"],
        moc_gating="paper", moc_shared_bank=False, moc_attention_impl=spec["impl"],
        use_cpu_initialization=True, params_dtype=torch.float32, gradient_accumulation_fusion=False,
    )
    torch.manual_seed(0)
    module = MoCMemoryAttention(config, layer_number=1).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        module.linear_o.weight.normal_(0, 0.02)
    hidden = torch.randn(spec["seq"], spec["batch"], spec["hidden"], device=device, dtype=dtype, requires_grad=True)
    probe = torch.randn_like(hidden)

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        hidden.grad = None
        out, _ = module(hidden)
        (out * probe).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def grad_bytes() -> int:
        return sum(p.grad.nbytes for p in module.parameters() if p.grad is not None)

    return _measure(step, device, spec["iters"], grad_bytes)


def _measure(step, device, iters: int, grad_bytes=None) -> dict:
    """Peak memory of the first ``step()`` above what exists before it, and the median time of ``iters`` more.

    ``grad_bytes()`` (layer scope) gives the bytes of the parameter gradients the first step left: part of every
    implementation's peak (the bank's is 201 MB at 1,024 routed chapters of 64 x 768 in fp32).
    """
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark to the current resident set
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024) - before
    grads = grad_bytes() if grad_bytes is not None else 0
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "param_grad_bytes": grads, "first_s": first,
            "median_s": statistics.median(times) if times else first, "times_s": times}


def main(argv: list[str] | None = None) -> int:
    """Run every (case, implementation) in a child process and print the table."""
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))))
        return 0
    rows = []
    for case_set in args.cases:
        for case in CASES[case_set]:
            for impl in args.impls:
                copies = gather_copy_bytes(case, args)
                row = dict(case=case["name"], impl=impl, gather_copy_gib=copies / 2**30)
                if impl == "gather" and copies > HUGE_BYTES and not args.allow_huge:
                    row["skipped"] = f"needs > {copies / 2**30:.1f} GiB for its K/V copies alone"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                spec = dict(case, impl=impl, device=args.device, dtype=args.dtype, hidden=args.hidden,
                            heads=args.heads, chapter_size=args.chapter_size, chunk_size=args.chunk_size,
                            iters=args.iters, threads=args.threads, scope=args.scope)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not result:
                    row["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                else:
                    row.update(json.loads(result[0][len("RESULT "):]))
                    row["tflops"] = attention_flops(case, args) / row["median_s"] / 1e12
                rows.append(row)
                print(json.dumps(row), flush=True)
    import torch

    print(f"\ntorch {torch.__version__}, {args.device}, {args.dtype}, hidden {args.hidden}, {args.heads} heads, "
          f"chapters of {args.chapter_size}, chunk {args.chunk_size}, {args.iters} timed iterations, "
          f"scope {args.scope}, {args.threads or 'default'} threads")
    print("| case | impl | peak memory (MB) | of which parameter gradients (MB) | time fwd+bwd (s, median) | "
          "attention TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "peak_bytes" in row:
            print(f"| {row['case']} | {row['impl']} | {row['peak_bytes'] / 1e6:,.0f} | "
                  f"{row['param_grad_bytes'] / 1e6:,.0f} | {row['median_s']:.2f} | {row['tflops']:.3f} |")
        else:
            print(f"| {row['case']} | {row['impl']} | {row.get('skipped') or row.get('error')} | | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
