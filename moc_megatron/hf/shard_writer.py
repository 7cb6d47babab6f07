"""Sharded safetensors output that writes each shard as soon as it is complete.

The shard plan is fixed up front from the tensors' sizes (so every file gets its final
``model-0000i-of-0000N.safetensors`` name at once); tensors are handed in plan order, a shard is
written and freed the moment its last tensor arrives, and ``model.safetensors.index.json`` is
written last.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units; KiB/MiB/GiB binary; a bare number is bytes)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 2GiB)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "B"]
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(value)


def plan_shards(groups: list[tuple[list[str], int]], max_shard_bytes: int) -> list[list[str]]:
    """Split ``groups`` (names written together, their bytes) into shards of at most ``max_shard_bytes``.

    A group larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for names, nbytes in groups:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(names)
        size += nbytes
    return [s for s in shards if s]


class ShardWriter:
    """Collects tensors by name and writes each planned shard once all its tensors are in."""

    def __init__(self, folder: str, shards: list[list[str]], progress=print) -> None:
        self.folder = folder
        self.shards = shards
        total = len(shards)
        self.file_of = {}
        for i, names in enumerate(shards):
            for name in names:
                self.file_of[name] = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        self._pending: list[dict[str, torch.Tensor]] = [{} for _ in shards]
        self._shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self._written = 0
        self.total_bytes = 0
        self.progress = progress

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Hand in one tensor; writes its shard if that completes it."""
        i = self._shard_of[name]
        self._pending[i][name] = tensor.contiguous()
        if len(self._pending[i]) == len(self.shards[i]):
            tensors = self._pending[i]
            self._pending[i] = {}
            path = os.path.join(self.folder, self.file_of[name])
            save_file(tensors, path, metadata={"format": "pt"})
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            self.total_bytes += nbytes
            self._written += 1
            self.progress(f"  wrote {os.path.basename(path)}: {len(tensors)} tensors, {nbytes / 1e6:.1f} MB")

    def finish(self) -> None:
        """Write ``model.safetensors.index.json`` (every shard must have been written)."""
        missing = [n for p in self._pending for n in p] + [
            n for i, names in enumerate(self.shards) for n in names if i >= self._written and not self._pending[i]
        ]
        if self._written != len(self.shards):
            raise RuntimeError(f"{len(self.shards) - self._written} shards incomplete (e.g. {missing[:3]})")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.file_of.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
