"""Read a megatron ``torch_dist`` checkpoint tensor by tensor, without building the model.

The checkpoint's ``.metadata`` (torch.distributed.checkpoint) holds every tensor's global shape and
where its pieces lie in the ``*.distcp`` files, whatever TP/PP/EP/VPP layout saved it; loading one key
into a tensor of its global shape reassembles it in this one process (``no_dist=True``).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moc_megatron.checkpoint.layout import CheckpointNotFoundError, resolve_existing
from moc_megatron.errors import MoCError
from moc_megatron.platform.megatron_versions import read_common_state


class CheckpointReadError(MoCError, RuntimeError):
    """The checkpoint is missing, incomplete or not a torch_dist checkpoint."""


def resolve_checkpoint(load: str, iteration: int | None) -> str:
    """``{load}/iter_XXXXXXX`` of ``iteration`` (default: the tracker's), or ``load`` itself if it is one."""
    try:
        return resolve_existing(load, iteration)[0]
    except CheckpointNotFoundError as exc:
        raise CheckpointReadError(str(exc)) from exc


class DistCheckpointReader:
    """Tensor-by-tensor access to one ``torch_dist`` checkpoint folder."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointReadError(f"{path}: no .metadata (not a complete torch_dist checkpoint)")
        self._reader = FileSystemReader(path)
        self.metadata = self._reader.read_metadata()
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self._check_files()  # first: since megatron-core 0.19 the common state lies in the .distcp files too
        try:
            self.common = read_common_state(path)
        except FileNotFoundError as exc:
            raise CheckpointReadError(f"{path}: no common state (not a complete megatron checkpoint)") from exc

    def _check_files(self) -> None:
        """Every ``.distcp`` file the metadata points into exists and is long enough (not truncated)."""
        needed: dict[str, int] = {}
        for info in (self.metadata.storage_data or {}).values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                raise CheckpointReadError(f"{file}: missing (the checkpoint's metadata refers to it)")
            size = os.path.getsize(file)
            if size < end:
                raise CheckpointReadError(f"{file}: truncated ({size} bytes, the metadata needs {end})")

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Global shape of ``key``, or ``None`` if the checkpoint has no such tensor."""
        md = self.tensors.get(key)
        return None if md is None else tuple(md.size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self.tensors[key].properties.dtype

    def nbytes(self, key: str) -> int:
        """Bytes of ``key`` at its stored dtype."""
        md = self.tensors[key]
        return md.size.numel() * torch.empty((), dtype=md.properties.dtype).element_size()

    def load(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key`` (assembled from however many ranks saved pieces of it)."""
        md = self.tensors.get(key)
        if md is None:
            raise CheckpointReadError(f"{self.path}: no tensor {key!r}")
        tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        if tensor.numel() == 0:
            return tensor
        with warnings.catch_warnings():  # torch's notice that no_dist=True loads in one process: what we ask for
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
            dcp_load({key: tensor}, storage_reader=self._reader, no_dist=True)
        return tensor
