"""``memory_layout_worker.py`` with the blocked path's K/V projection in blocks of two chapters.

Launched by tests/distributed/test_projected_read_parallel.py; same environment and output as
``memory_layout_worker.py``. ``PROJECTION_BLOCK_ELEMENTS`` (memory-token elements per block) is set before the
layer runs, so the read projects and reads block by block (moc_megatron/kernels/projected.py) under every
TP / SP / EP layout, including the per-block recomputation (and the tensor-parallel all-reduce of the K/V
projections' input gradient) in backward.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory_layout_worker  # noqa: E402

from moc_megatron.kernels import projected  # noqa: E402

if __name__ == "__main__":
    projected.PROJECTION_BLOCK_ELEMENTS = int(os.environ["PROJECTION_BLOCK_ELEMENTS"])
    memory_layout_worker.main()
