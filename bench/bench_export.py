"""Export time and peak resident memory of ``convert_checkpoint.py export`` on a preset-size checkpoint.

A checkpoint of ``--preset`` (default ``moc-paper``; random weights from the model's own initialisation) is
saved once by the project's weights-only checkpoint writer, then ``tools/convert_checkpoint.py export`` runs
in a fresh process; its wall time and peak RSS (``ru_maxrss`` of the child) are compared with the goal
``1.5 x (max shard size + largest tensor) + 1 GB``.

    python bench/bench_export.py --workdir /tmp/bench_export [--max-shard-size 1GB] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="Folder for the checkpoint and the export (created).")
    p.add_argument("--preset", default="moc-paper")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--keep", action="store_true", help="Keep the checkpoint and the export.")
    return p.parse_args(argv)


def save_checkpoint(preset: str, root: str) -> None:
    """Build ``preset`` (random init) in this process and save it as ``root/iter_0000000``."""
    from moc_megatron import platform
    from moc_megatron.checkpoint import layout as meta
    from moc_megatron.checkpoint.weights import save_weights_checkpoint
    from moc_megatron.model.builder import build_model
    from moc_megatron.training.arguments import parse_run_config
    from moc_megatron.training.config_from_args import run_model_settings

    run = parse_run_config(["--preset", preset, "--mock-data", "--micro-batch-size", "1", "--train-iters", "1",
                            "--lr", "1e-4"], world_size=1, exit_on_error=False)
    platform.initialize_distributed()
    config, settings = run.model, run_model_settings(run)
    model = build_model(config, settings)
    os.makedirs(meta.checkpoint_path(root, 0))
    path = meta.checkpoint_path(root, 0)
    save_weights_checkpoint({"model": model.sharded_state_dict()}, config, settings, path, run.saved_args)
    meta.write_tracker(root, 0)


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> int:
    """Save, export in a child process, print the numbers."""
    opts = parse_args(argv)
    sys.path.insert(0, ROOT)
    from moc_megatron.hf.dist_reader import DistCheckpointReader
    from moc_megatron.hf.shard_writer import parse_size

    ckpt, out = os.path.join(opts.workdir, "ckpt"), os.path.join(opts.workdir, "hf")
    if not os.path.exists(ckpt):
        start = time.time()
        save_checkpoint(opts.preset, ckpt)
        print(f"saved {opts.preset} checkpoint in {time.time() - start:.1f} s")
    shutil.rmtree(out, ignore_errors=True)
    reader = DistCheckpointReader(os.path.join(ckpt, "iter_0000000"))
    largest = max(reader.nbytes(k) for k in reader.tensors if not k.startswith("optimizer"))
    start = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export", "--load", ckpt,
                    "--output", out, "--max-shard-size", opts.max_shard_size], check=True)
    wall = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    shard = parse_size(opts.max_shard_size)
    goal = 1.5 * (shard + largest) + 1e9
    print(f"checkpoint {folder_bytes(ckpt) / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB, "
          f"max shard {shard / 1e9:.2f} GB, export {folder_bytes(out) / 1e9:.2f} GB")
    print(f"export wall {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB, goal < {goal / 1e9:.2f} GB: "
          f"{'met' if peak < goal else 'NOT met'}")
    if not opts.keep:
        shutil.rmtree(opts.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
