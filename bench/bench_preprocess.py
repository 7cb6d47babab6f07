"""Benchmark tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py, side by side.

Both tools run as subprocesses on the same jsonl input, tokenizer and worker counts, with ``--append-eod``,
interleaved and repeated (``--repeats``; the fastest run counts, which filters out load from other jobs).
Each setting also runs on the first half of the input, so that besides the end-to-end rates (startup
included) the rates of the second half, ``(full - half) / (t_full - t_half)``, show the throughput without
startup costs. Reported: wall time, CPU time of the run's processes, CPU time other jobs used meanwhile
(noise), documents/s, tokens/s and MB/s. When both tools ran, the outputs are compared byte for byte.

Megatron-LM is not vendored: pass ``--megatron-lm-dir`` pointing at a Megatron-LM checkout whose
``megatron`` package matches the installed megatron-core (e.g. tag ``core_v0.16.1``); its extra
dependencies (six, regex, pydantic, triton at that tag) can live in a folder given by
``--megatron-pythonpath``. Without it, that side is skipped with a message.

Example (2-core machine, ~30 MB of synthetic + CPython text, a 4096-piece tokenizer trained on the fly):

    python bench/bench_preprocess.py --mb 30 --workers 1 2 --megatron-lm-dir ~/src/Megatron-LM
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_TOOL = REPO_ROOT / "tools" / "preprocess_data.py"
# Megatron-LM's name for the same sentencepiece semantics as ours (eod = the model's eos, no extra tokens).
MEGATRON_TOKENIZER_TYPE = {
    "SentencePieceTokenizer": "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
}


@dataclass
class Run:
    """The best timings of one tool at one worker count, on the input and on its first half."""

    tool: str
    workers: int
    partitions: int
    wall_s: float
    cpu_s: float
    """CPU seconds of all the run's processes (user + system)."""
    other_cpu_s: float
    """CPU seconds other jobs on the machine used during the run (noise; NaN where unknown)."""
    documents: int
    tokens: int
    input_mb: float
    half_wall_s: float
    half_documents: int
    half_tokens: int
    half_mb: float

    def rates(self) -> tuple[float, float, float]:
        """docs/s, tokens/s, MB/s end to end (startup included)."""
        return self.documents / self.wall_s, self.tokens / self.wall_s, self.input_mb / self.wall_s

    def steady_rates(self) -> tuple[float, float, float] | None:
        """docs/s, tokens/s, MB/s of the second half of the input: (full - half) / (t_full - t_half).

        Startup costs cancel out, whether or not a tool overlaps them with work. ``None`` if noise made
        the half run slower than the full one.
        """
        t = self.wall_s - self.half_wall_s
        if t <= 0:
            return None
        return (
            (self.documents - self.half_documents) / t,
            (self.tokens - self.half_tokens) / t,
            (self.input_mb - self.half_mb) / t,
        )


def read_idx_counts(idx_path: str) -> tuple[int, int]:
    """(documents, tokens) of a Megatron .idx file, read directly (no megatron import)."""
    with open(idx_path, "rb") as f:
        header = f.read(9 + 8 + 1 + 8 + 8)
        sequences, documents = struct.unpack("<QQ", header[18:34])
        lengths = np.frombuffer(f.read(4 * sequences), dtype=np.int32)
    return documents - 1, int(lengths.sum())


def build_input(work: Path, megabytes: float) -> Path:
    """Synthetic biographies and CPython documentation, repeated up to ``megabytes`` MB of jsonl."""
    from moc_megatron.data.synthetic_corpus import corpus_documents, generate_people
    from moc_megatron.data.text_corpus import text_corpus_documents

    lines = [json.dumps({"text": d["text"]}) for d in text_corpus_documents()]
    lines += [json.dumps({"text": d["text"]}) for d in corpus_documents(generate_people(20000, seed=0), 1, seed=0)]
    path = work / "bench_input.jsonl"
    target = megabytes * 2**20
    written = 0
    with open(path, "wb") as f:
        while written < target:
            for line in lines:
                data = line.encode() + b"\n"
                f.write(data)
                written += len(data)
                if written >= target:
                    break
    return path


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes, all users), from /proc/stat; 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_tool(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Run ``cmd``; returns wall time, its CPU time (all its processes) and the CPU time other jobs used meanwhile.

    Raises with the log tail on failure.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = machine_busy_seconds()
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    busy = machine_busy_seconds() - busy_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[1]} failed with exit status {proc.returncode}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, max(busy - cpu, 0.0) if busy else float("nan")


def tool_command(tool: str, args: argparse.Namespace, input_path: Path, prefix: Path, workers: int) -> list[str]:
    """The command line of one run."""
    common = [
        "--input", str(input_path), "--output-prefix", str(prefix), "--tokenizer-model", str(args.tokenizer_model),
        "--append-eod", "--workers", str(workers), "--partitions", str(args.partitions), "--log-interval", "1000000000",
    ]  # fmt: skip
    if tool == "moc-megatron":
        return [sys.executable, str(OUR_TOOL), "--tokenizer-type", args.tokenizer_type, *common]
    script = str(Path(args.megatron_lm_dir) / "tools" / "preprocess_data.py")
    return [args.megatron_python, script, "--tokenizer-type", args.megatron_tokenizer_type, *common]


def tool_env(tool: str, args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """Working directory and environment of a tool's runs."""
    env = dict(os.environ)
    if tool == "moc-megatron":
        return REPO_ROOT, env
    paths = [str(Path(args.megatron_lm_dir).resolve())] + (
        [args.megatron_pythonpath] if args.megatron_pythonpath else []
    )
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return Path(args.megatron_lm_dir), env


def write_half(input_path: Path, half: Path) -> None:
    """The first half (by bytes, whole lines) of ``input_path``."""
    half.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.getsize(input_path) // 2
    with open(input_path, "rb") as src, open(half, "wb") as dst:
        written = 0
        for line in src:
            if written >= target:
                break
            dst.write(line)
            written += len(line)


def bench(tools: list[str], args: argparse.Namespace, input_path: Path, work: Path) -> list[Run]:
    """Every (workers, tool, full/half input) setting ``--repeats`` times, interleaved; the fastest run counts."""
    half = work / "half" / "input.jsonl"
    write_half(input_path, half)
    best: dict[tuple[str, int, str], tuple[float, float, float]] = {}
    for repeat in range(args.repeats):
        for workers in args.workers:
            for tool in tools:
                cwd, env = tool_env(tool, args)
                for size, path in (("full", input_path), ("half", half)):
                    out_dir = work / f"{tool}_w{workers}_{size}"
                    out_dir.mkdir(exist_ok=True)
                    cmd = tool_command(tool, args, path, out_dir / "out", workers)
                    measured = run_tool(cmd, cwd, env, out_dir / f"log{repeat}.txt")
                    if (tool, workers, size) not in best or measured[0] < best[tool, workers, size][0]:
                        best[tool, workers, size] = measured
    runs = []
    for tool in tools:
        for workers in args.workers:
            documents, tokens = read_idx_counts(str(work / f"{tool}_w{workers}_full" / "out_text_document.idx"))
            half_docs, half_tokens = read_idx_counts(str(work / f"{tool}_w{workers}_half" / "out_text_document.idx"))
            wall, cpu, other = best[tool, workers, "full"]
            runs.append(
                Run(
                    tool,
                    workers,
                    args.partitions,
                    wall,
                    cpu,
                    other,
                    documents,
                    tokens,
                    os.path.getsize(input_path) / 2**20,
                    best[tool, workers, "half"][0],
                    half_docs,
                    half_tokens,
                    os.path.getsize(half) / 2**20,
                )  # fmt: skip
            )
    return runs


def print_run(run: Run) -> None:
    """One result line."""
    d, t, m = run.rates()
    steady = run.steady_rates()
    rest = f"{steady[0]:8,.0f} docs/s {steady[1]:10,.0f} tokens/s {steady[2]:5.2f} MB/s" if steady else "n/a (noise)"
    print(
        f"{run.tool:>13} workers={run.workers} partitions={run.partitions}: {run.wall_s:6.2f} s wall "
        f"({run.half_wall_s:.2f} s for the first half), {run.cpu_s:6.2f} s CPU, "
        f"other jobs {run.other_cpu_s:.1f} s CPU\n"
        f"{'':>15}end to end {d:8,.0f} docs/s {t:10,.0f} tokens/s {m:5.2f} MB/s | second half {rest}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="jsonl input with a 'text' key (default: built, see --mb)")
    parser.add_argument("--mb", type=float, default=30.0, help="size of the built input")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    parser.add_argument("--tokenizer-model", help="default: train a sentencepiece model on the input")
    parser.add_argument("--vocab-size", type=int, default=4096, help="of the trained default tokenizer")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest counts")
    parser.add_argument("--megatron-lm-dir", help="a Megatron-LM checkout (its tools/preprocess_data.py is run)")
    parser.add_argument("--megatron-tokenizer-type", help="default: Megatron-LM's equivalent of --tokenizer-type")
    parser.add_argument("--megatron-pythonpath", help="extra PYTHONPATH entry for Megatron-LM's dependencies")
    parser.add_argument("--megatron-python", default=sys.executable, help="interpreter for Megatron-LM's tool")
    parser.add_argument("--work-dir", help="keep inputs and outputs here (default: a temporary folder)")
    parser.add_argument("--json-output", help="write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench_preprocess_")
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        input_path = Path(args.input) if args.input else build_input(work, args.mb)
        if not args.tokenizer_model:
            from moc_megatron.data.tokenizer_training import train_sentencepiece

            args.tokenizer_model = train_sentencepiece(
                [str(input_path)], str(work / "bench_tokenizer"), args.vocab_size, max_bytes=20 << 20
            )
        args.megatron_tokenizer_type = args.megatron_tokenizer_type or MEGATRON_TOKENIZER_TYPE[args.tokenizer_type]
        print(
            f"input {input_path} ({os.path.getsize(input_path) / 2**20:.1f} MB), tokenizer {args.tokenizer_type} "
            f"{args.tokenizer_model}, {len(os.sched_getaffinity(0))} CPU cores available",
            flush=True,
        )
        tools = ["moc-megatron"]
        megatron_script = Path(args.megatron_lm_dir or "") / "tools" / "preprocess_data.py"
        if not args.megatron_lm_dir:
            print("Megatron-LM side skipped: no --megatron-lm-dir given", flush=True)
        elif not megatron_script.is_file():
            print(f"Megatron-LM side skipped: {megatron_script} not found (is --megatron-lm-dir a checkout?)")
        else:
            tools.append("megatron-lm")
        runs = bench(tools, args, input_path, work)
        for run in runs:
            print_run(run)
        if "megatron-lm" in tools:
            for workers in args.workers:
                same = all(
                    (work / f"moc-megatron_w{workers}_full" / f"out_text_document{s}").read_bytes()
                    == (work / f"megatron-lm_w{workers}_full" / f"out_text_document{s}").read_bytes()
                    for s in (".bin", ".idx")
                )
                print(f"workers={workers}: outputs byte-identical: {same}")
        for tool in tools:
            by_workers = {r.workers: r for r in runs if r.tool == tool}
            if 1 in by_workers and len(by_workers) > 1:
                for workers, run in sorted(by_workers.items()):
                    if workers == 1:
                        continue
                    end_to_end = by_workers[1].wall_s / run.wall_s
                    one, many = by_workers[1].steady_rates(), run.steady_rates()
                    steady = f"{many[1] / one[1]:.2f}x" if one and many else "n/a"
                    print(f"{tool}: {workers} workers vs 1: {end_to_end:.2f}x end to end, {steady} on the second half")
        if args.json_output:
            with open(args.json_output, "w") as f:
                json.dump([asdict(r) for r in runs], f, indent=2)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
