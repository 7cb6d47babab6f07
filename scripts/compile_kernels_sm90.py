"""Compile every Triton kernel variant the chapter attention launches, for an H100 (sm_90), without a GPU.

The project's own forward and backward (``triton_chapter_attention``, the ``impl="triton"`` read) run on small
CPU tensors at the given shapes with every ``kernel[grid](...)`` launch intercepted (nothing is launched), for
every routing unit (sequence, chunk, token), read site (the whole read on one rank; under expert parallelism
the owner's routed partial and the local shared partial), gating (paper, mixture), schedule (the default
and the other one forced) and dtype. Each distinct launch -- kernel, argument dtypes, Triton's
specialisation of the integer and pointer arguments (``== 1``, divisible by 16) and constexprs, exactly as
``JITFunction.run`` would build it -- is compiled once with Triton's own pipeline for
``GPUTarget("cuda", 90, 32)``. Reported per variant: shared memory, registers and spill bytes (ptxas's
``-v`` log), and tensor-core instructions (``wgmma``/``mma`` in the PTX). It says what the compiler
produces, not speed or correctness.

    python scripts/compile_kernels_sm90.py                       # the paper's shapes, bf16 fp16 fp32
    python scripts/compile_kernels_sm90.py --heads 8 --kv-heads 2 --hidden 1024 --chapter-size 128 \\
        --top-k 16 --dtype bf16 --json out.json

Exit status 1 when a variant does not compile. Triton's cache goes to a temporary directory that is
removed at exit (``TMPDIR`` chooses where).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SM90_SHARED_LIMIT = 232448
"""Bytes of shared memory one block may use on an H100 (sm_90, opt-in maximum)."""

SUPPORTED_TRITON = ("3.9", "3.7")
"""Triton minor versions whose internal compile API :func:`launch_source` is written for."""

DTYPES = ("bf16", "fp16", "fp32")
ROUTING_UNITS = ("sequence", "chunk", "token")
GATINGS = ("paper", "mixture")
MAX_QUERY_ROWS = 4096
"""Valid (unit, slot, query) rows per CPU run; beyond it the later slots are left empty (-1). Slot values do
not enter a kernel's specialisation (only dtypes, shapes' divisibility and constexprs do)."""


@dataclass(frozen=True)
class Shapes:
    """The model shapes the memory read is launched at."""

    hidden: int
    heads: int
    kv_heads: int
    chapter_size: int
    top_k: int
    shared_chapters: int
    seq_length: int
    chunk_size: int

    @property
    def head_dim(self) -> int:
        """Width of one memory head (``hidden / heads``, as ``MoCConfig.moc_head_dim``)."""
        return self.hidden // self.heads

    def check(self) -> None:
        """Raise ``ValueError`` on shapes the model would reject."""
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}")
        for name in ("chapter_size", "top_k", "seq_length", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.shared_chapters < 0:
            raise ValueError(f"--shared-chapters must be >= 0, got {self.shared_chapters}")

    def unit_length(self, routing_unit: str) -> int:
        """Queries per routing unit (``RoutingUnits.unit_length``)."""
        return {"sequence": self.seq_length, "chunk": self.chunk_size, "token": 1}[routing_unit]

    def sites(self) -> dict[str, int]:
        """The read sites of the memory layer and the number of chapter slots each passes (``k``)."""
        sites = {"local": self.top_k + self.shared_chapters, "ep-routed": self.top_k}
        if self.shared_chapters:
            sites["ep-shared"] = self.shared_chapters
        return sites


@dataclass(frozen=True)
class Case:
    """One forward + backward of the read: routing unit, read site, gating, dtype, schedule."""

    routing_unit: str
    site: str
    gating: str
    dtype: str
    schedule: str
    forced: bool

    def label(self) -> str:
        """``unit/site/schedule`` (``!`` marks a forced schedule)."""
        return f"{self.routing_unit}/{self.site}/{self.schedule}{'!' if self.forced else ''}"


@dataclass
class Variant:
    """One distinct compiled kernel and the cases that launch it (picklable: compile workers receive it)."""

    kernel: str
    dtype: str
    gating: str
    module: str
    source: dict[str, Any]
    """``ASTSource``'s ``signature``, ``constants`` and ``attrs`` as a launch builds them."""
    options: dict
    constexprs: dict[str, Any]
    specialised: dict[str, str]
    key: str
    cases: list[Case] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON object of this variant."""
        return {
            "kernel": self.kernel, "dtype": self.dtype, "gating": self.gating, **self.result,
            "routing_units": sorted({c.routing_unit for c in self.cases}, key=ROUTING_UNITS.index),
            "schedules": sorted({c.schedule for c in self.cases}),
            "launched_by": [c.label() for c in self.cases],
            "constexprs": self.constexprs, "specialised": self.specialised,
            "num_warps": self.options.get("num_warps"), "num_stages": self.options.get("num_stages"),
        }


def paper_defaults() -> dict[str, int]:
    """The paper preset's memory shapes (``moc_megatron/presets.py``) and the default chunk size."""
    from moc_megatron.config import MoCConfig
    from moc_megatron.presets import PRESETS

    preset = PRESETS["moc-paper"]
    mem = preset.memory
    return dict(hidden=preset.backbone.hidden_size, heads=mem.moc_num_heads, kv_heads=mem.moc_num_query_groups,
                chapter_size=mem.moc_chapter_size, top_k=mem.moc_top_k, shared_chapters=mem.moc_num_shared_chapters,
                seq_length=preset.seq_length, chunk_size=MoCConfig.__dataclass_fields__["moc_chunk_size"].default)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (defaults: the paper's shapes)."""
    d = paper_defaults()
    p = argparse.ArgumentParser(description="Compile every chapter-attention Triton kernel variant for sm_90.")
    p.add_argument("--hidden", type=int, default=d["hidden"], help="model width (memory head dim = hidden / heads)")
    p.add_argument("--heads", type=int, default=d["heads"], help="memory query heads")
    p.add_argument("--kv-heads", type=int, default=d["kv_heads"], help="memory key/value heads")
    p.add_argument("--chapter-size", type=int, default=d["chapter_size"], help="tokens per chapter (T)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="routed chapters per unit")
    p.add_argument("--shared-chapters", type=int, default=d["shared_chapters"], help="shared chapters per unit")
    p.add_argument("--seq-length", type=int, default=d["seq_length"], help="queries of a sequence routing unit")
    p.add_argument("--chunk-size", type=int, default=d["chunk_size"], help="queries of a chunk routing unit")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES), help="input dtypes")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="compile in this many forked processes (default: CPU count, at most 8)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the variants as a JSON list to OUT")
    return p


def _triton_api() -> dict[str, Any]:
    """Triton's internal compile entry points; the one place that knows the installed version's API."""
    import triton

    version = ".".join(triton.__version__.split(".")[:2])
    if version not in SUPPORTED_TRITON:
        raise RuntimeError(f"compile_kernels_sm90.py supports triton {', '.join(SUPPORTED_TRITON)}.x (the tested "
                           f"stacks), found {triton.__version__}: its internal compile API may differ; see _triton_api")
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    def launch_source(fn, args: tuple, kwargs: dict, target) -> tuple[Any, dict, list]:
        # As JITFunction.run: launch options from knobs, binder -> specialisation, _pack_args -> compile inputs.
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # a launch option since 3.9
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return src, options.__dict__, spec

    def source(fn, signature: dict, constants: dict, attrs: dict):
        return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)

    return dict(target=GPUTarget("cuda", 90, 32), launch_source=launch_source, source=source, compile=triton.compile,
                jit_class=triton.runtime.jit.JITFunction)


@contextlib.contextmanager
def intercepted_launches(jit_class) -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record ``(kernel, args, kwargs)`` of every ``kernel[grid](...)`` inside the block instead of launching."""
    calls: list[tuple[Any, tuple, dict]] = []

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    original = jit_class.run
    jit_class.run = record
    try:
        yield calls
    finally:
        jit_class.run = original


def run_case(shapes: Shapes, case: Case, jit_class) -> list[tuple[Any, tuple, dict]]:
    """The kernel launches of one forward and backward of the project's Triton read on CPU tensors."""
    import torch

    from moc_megatron.kernels.triton_chapter_attention import triton_chapter_attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    n, u, k = 1, shapes.unit_length(case.routing_unit), shapes.sites()[case.site]
    c = k + 1
    valid = min(k, max(1, MAX_QUERY_ROWS // (n * u)))
    if case.site == "ep-routed":  # the owner holds some of a unit's chapters, the rest live elsewhere
        valid = max(1, min(valid, k // 2))
    gen = torch.Generator().manual_seed(0)
    slots = torch.arange(k).expand(n, k)
    selected = torch.where(slots < valid, slots, -1)
    query = torch.randn(n, u, shapes.heads, shapes.head_dim, generator=gen).to(dtype).requires_grad_()
    kv_shape = (c, shapes.chapter_size, shapes.kv_heads, shapes.head_dim)
    keys = torch.randn(kv_shape, generator=gen).to(dtype).requires_grad_()
    values = torch.randn(kv_shape, generator=gen).to(dtype).requires_grad_()
    weights = torch.rand(n, k, generator=gen).requires_grad_()
    with intercepted_launches(jit_class) as calls:
        out, lse = triton_chapter_attention(query, keys, values, selected, weights, case.gating,
                                            shapes.head_dim ** -0.5, schedule=case.schedule)
        loss = out.float().sum() + (lse.sum() if lse is not None else 0.0)
        loss.backward()
    return calls


def default_schedule(shapes: Shapes, routing_unit: str) -> str:
    """The schedule ``triton_chapter_attention`` picks for a unit of this routing unit."""
    from moc_megatron.kernels.triton_chapter_attention import UNIT_MAJOR_MIN_QUERIES

    return "unit" if shapes.unit_length(routing_unit) >= UNIT_MAJOR_MIN_QUERIES else "chapter"


def cases(shapes: Shapes, dtypes: Sequence[str]) -> list[Case]:
    """Every routing unit x read site x gating x dtype, with the default schedule and the other one forced."""
    out = []
    for dtype in dtypes:
        for gating in GATINGS:
            for unit in ROUTING_UNITS:
                default = default_schedule(shapes, unit)
                for site in shapes.sites():
                    for schedule in (default, "chapter" if default == "unit" else "unit"):
                        out.append(Case(unit, site, gating, dtype, schedule, schedule != default))
    return out


def launches_of_case(shapes: Shapes, case: Case, api: dict[str, Any]) -> list[Variant]:
    """The distinct compiled variants one case launches (each with ``cases == [case]``)."""
    out = []
    for fn, args, kwargs in run_case(shapes, case, api["jit_class"]):
        src, options, spec = api["launch_source"](fn, args, kwargs, api["target"])
        constexprs = {p.name: v for p, (ty, v) in zip(fn.params, spec) if p.is_constexpr}
        specialised = {p.name: ("=1" if ty == "constexpr" else "%16") for p, (ty, v) in zip(fn.params, spec)
                       if not p.is_constexpr and (ty == "constexpr" or (v == "D" and not ty.startswith("*")))}
        source = dict(signature=src.signature, constants=src.constants, attrs=src.attrs)
        key = repr((src.hash(), sorted(options.items())))
        out.append(Variant(fn.fn.__name__, case.dtype, case.gating, fn.module, source, options, constexprs,
                           specialised, key, [case]))
    return out


def compile_variant(variant: Variant, api: dict[str, Any]) -> dict[str, Any]:
    """Compile one variant for sm_90; its metrics from the compiled object, ptxas's log and the PTX."""
    import importlib

    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    src = api["source"](fn, variant.source["signature"], variant.source["constants"], variant.source["attrs"])
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = api["compile"](src, target=api["target"], options=variant.options)
    except Exception as exc:  # a compile error of one variant is a result, not the end of the run
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return dict(compiled=False, error=message[:500], shared_bytes=None, registers=None, spill_bytes=None,
                    spill_load_bytes=None, tensor_core_instructions=None, wgmma_instructions=None)
    text = log.getvalue()
    regs, spills = _REGS.search(text), _SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v resource line for {variant.kernel} (TRITON_DUMP_PTXAS_LOG not honoured?)")
    ptx = compiled.asm["ptx"]
    return dict(compiled=True, error=None, shared_bytes=int(compiled.metadata.shared), registers=int(regs[1]),
                spill_bytes=int(spills[1]), spill_load_bytes=int(spills[2]),
                tensor_core_instructions=len(_TENSOR_CORE.findall(ptx)),
                wgmma_instructions=ptx.count("wgmma.mma_async"))


_WORKER: dict[str, Any] = {}
"""What the (forked) workers read: the shapes, the cases, the Triton API. Inherited, never pickled."""


def _work(task: tuple[str, Any]) -> tuple[str, Any, Any, float]:
    kind, item = task
    start = time.perf_counter()
    if kind == "case":
        result = launches_of_case(_WORKER["shapes"], _WORKER["cases"][item], _WORKER["api"])
    else:
        result = compile_variant(item, _WORKER["api"])
    return kind, item, result, time.perf_counter() - start


def _limit_threads() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores


@contextlib.contextmanager
def worker_map(jobs: int) -> Iterator[Any]:
    """``imap_unordered`` over ``jobs`` forked workers (the parent's own ``map`` for one job)."""
    if jobs <= 1:
        yield lambda fn, tasks: map(fn, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs, initializer=_limit_threads) as pool:
        yield pool.imap_unordered


def collect_and_compile(shapes: Shapes, dtypes: Sequence[str], api: dict[str, Any], jobs: int
                        ) -> tuple[list[Variant], float]:
    """Run every case, group its launches into distinct variants (in case order) and compile each once.

    Returns the variants (results filled in) and the seconds spent collecting launches. Progress on stderr.
    """
    all_cases = cases(shapes, dtypes)
    _WORKER.update(shapes=shapes, cases=all_cases, api=api)
    start = time.perf_counter()
    with worker_map(jobs) as imap:
        per_case: dict[int, list[Variant]] = {}
        for done, (_, i, found, seconds) in enumerate(imap(_work, [("case", i) for i in range(len(all_cases))]), 1):
            per_case[i] = found
            c = all_cases[i]
            print(f"[launch {done}/{len(all_cases)}] {c.dtype} {c.gating} {c.label()}: {len(found)} kernels "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
        variants: dict[str, Variant] = {}
        for i in range(len(all_cases)):
            for v in per_case[i]:
                if v.key in variants:
                    variants[v.key].cases.extend(v.cases)
                else:
                    variants[v.key] = v
        ordered = list(variants.values())
        collected = time.perf_counter() - start
        results = imap(_work, [("variant", v) for v in ordered])
        by_key = {v.key: v for v in ordered}
        for done, (_, item, result, seconds) in enumerate(results, 1):
            v = by_key[item.key]
            v.result = result
            status = "ok" if result["compiled"] else "FAILED: " + result["error"]
            print(f"[compile {done}/{len(ordered)}] {v.kernel} {v.dtype} {v.gating} {_flags(v)}: {status} "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
    _WORKER.clear()
    return ordered, collected


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TENSOR_CORE = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync|mma\.sp)", re.MULTILINE)


def _flags(v: Variant) -> str:
    shown = {k: int(x) if isinstance(x, bool) else x for k, x in v.constexprs.items()
             if k in ("WRITE_DQ",) or (k == "PREC" and x == "ieee")}
    parts = [f"{k}={x}" for k, x in shown.items()] + [f"{k}{s}" for k, s in v.specialised.items() if s == "=1"]
    return " ".join(parts) or "-"


def format_table(variants: list[Variant]) -> str:
    """A fixed-width table: one row per variant."""
    head = ("#", "kernel", "dtype", "gating", "flags", "launched by (unit/site/schedule, ! = forced)", "warps",
            "stages", "smem B", "regs", "spill B", "TC ins", "ok")
    rows = []
    for i, v in enumerate(variants, 1):
        r = v.result
        labels = [c.label() for c in v.cases]
        shown = ", ".join(labels[:2]) + (f" +{len(labels) - 2}" if len(labels) > 2 else "")
        rows.append((str(i), v.kernel, v.dtype, v.gating, _flags(v), shown, str(v.options.get("num_warps")),
                     str(v.options.get("num_stages")), str(r["shared_bytes"]), str(r["registers"]),
                     str(r["spill_bytes"]), str(r["tensor_core_instructions"]), "yes" if r["compiled"] else "NO"))
    widths = [max(len(x[j]) for x in [head, *rows]) for j in range(len(head))]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    """Collect, compile and report every variant; 1 if any failed to compile."""
    # Before anything imports triton: real JIT kernels (not the interpreter's), ptxas's -v log on stdout.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    if "triton" in sys.modules and getattr(sys.modules["triton"], "knobs", None) is not None:
        if sys.modules["triton"].knobs.runtime.interpret:
            raise RuntimeError("triton was imported with TRITON_INTERPRET=1: run this script in a fresh process")
    args = build_parser().parse_args(argv)
    shapes = Shapes(args.hidden, args.heads, args.kv_heads, args.chapter_size, args.top_k, args.shared_chapters,
                    args.seq_length, args.chunk_size)
    try:
        shapes.check()
    except ValueError as exc:
        print(f"compile_kernels_sm90.py: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="triton-sm90-") as cache:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "cache")
        os.environ["TRITON_HOME"] = cache
        api = _triton_api()
        import triton

        start = time.perf_counter()
        variants, collecting = collect_and_compile(shapes, args.dtype, api, args.jobs)
        compiling = time.perf_counter() - start - collecting
    print(f"triton {triton.__version__}, target sm_90; hidden {shapes.hidden}, heads {shapes.heads}, kv-heads "
          f"{shapes.kv_heads}, head dim {shapes.head_dim}, chapter {shapes.chapter_size}, top-k {shapes.top_k} + "
          f"{shapes.shared_chapters} shared, sequence {shapes.seq_length}, chunk {shapes.chunk_size}")
    print(format_table(variants))
    failed = sum(not v.result["compiled"] for v in variants)
    print(f"{len(variants)} variants, {len(variants) - failed} compiled, {failed} failed; sm_90 shared-memory limit "
          f"{SM90_SHARED_LIMIT} B; {collecting:.0f} s collecting launches, {compiling:.0f} s compiling "
          f"({args.jobs} jobs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([v.record() for v in variants], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
