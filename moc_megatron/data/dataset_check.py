"""Startup check of a Megatron indexed dataset (``{prefix}.bin`` + ``{prefix}.idx``) before training reads it.

megatron-core's ``IndexedDataset`` memory-maps both files and trusts them: a truncated ``.bin`` fails deep
in a data-loader worker (or reads past a sample's end) long after start-up, a corrupt ``.idx`` fails on an
``assert`` or silently yields wrong samples. :func:`check_indexed_dataset` reads only the index (its size is
``O(sequences)``, not ``O(tokens)``) and checks that it is whole and consistent and that the ``.bin`` has
exactly the bytes the index describes; the error names the file.

Index layout (megatron-core 0.16.1, ``_IndexWriter``): ``MMIDIDX\\x00\\x00``, version ``<Q`` = 1, dtype code
``<B``, sequence count ``<Q``, document count ``<Q``, then int32 sequence lengths, int64 sequence pointers
(byte offsets into the ``.bin``), int64 document indices (``0 .. sequence count``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from moc_megatron.errors import MoCError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
# megatron.core.datasets.indexed_dataset.DType codes -> item sizes
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


class DatasetFileError(MoCError, ValueError):
    """A dataset file that is missing, truncated or inconsistent; the message starts with its path."""


@dataclass(frozen=True)
class IndexSummary:
    """What a checked index holds."""

    sequences: int
    documents: int
    tokens: int
    itemsize: int


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """Check ``{prefix}.idx`` and ``{prefix}.bin``; raise :class:`DatasetFileError` naming the bad file."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DatasetFileError(f"{path}: no such file (dataset prefix {prefix!r})")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != INDEX_MAGIC:
        raise DatasetFileError(f"{idx_path}: not a Megatron index (bad or truncated header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in _DTYPE_SIZES:
        raise DatasetFileError(f"{idx_path}: unsupported index (version {version}, dtype code {code})")
    expected = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size != expected:
        raise DatasetFileError(f"{idx_path}: {idx_size} bytes, but its header ({sequences} sequences, "
                               f"{documents} documents) needs {expected}: truncated or corrupt")
    if sequences == 0 or documents < 2:
        raise DatasetFileError(f"{idx_path}: empty dataset ({sequences} sequences)")
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=HEADER_BYTES)
    pointers = np.fromfile(idx_path, dtype=np.int64, count=sequences, offset=HEADER_BYTES + 4 * sequences)
    doc_idx = np.fromfile(idx_path, dtype=np.int64, count=documents, offset=HEADER_BYTES + 12 * sequences)
    itemsize = _DTYPE_SIZES[code]
    if (lengths < 0).any() or pointers[0] != 0 or \
            (np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize).any():
        raise DatasetFileError(f"{idx_path}: sequence lengths and pointers disagree: corrupt index")
    if doc_idx[0] != 0 or doc_idx[-1] != sequences or (np.diff(doc_idx) < 0).any():
        raise DatasetFileError(f"{idx_path}: document indices are not 0..{sequences} in order: corrupt index")
    bin_expected = int(pointers[-1]) + int(lengths[-1]) * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != bin_expected:
        what = "truncated" if bin_size < bin_expected else "longer than its index"
        raise DatasetFileError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {bin_expected}: {what} "
                               "(re-run the preprocessing)")
    return IndexSummary(sequences, documents - 1, bin_expected // itemsize, itemsize)
