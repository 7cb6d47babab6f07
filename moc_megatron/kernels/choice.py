"""Which chapter-attention implementation reads a memory layer's units: decided here, once per read.

``--moc-attention-impl`` names ``auto``, ``triton``, ``blocked`` or ``gather``; what runs also depends on
the device, the dtype, the size of the read and whether its log-sum-exp is needed (partials to merge).
:func:`choose_read` makes the whole decision; :func:`resolve_impl` and :func:`fits_one_block` are its parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moc_megatron.kernels import blocked, projected, triton_available

IMPLEMENTATIONS = ("auto", "triton", "blocked", "gather")
"""Values of ``impl`` (and of ``--moc-attention-impl``)."""


@dataclass(frozen=True)
class ReadChoice:
    """How one read runs."""

    impl: str
    """``gather``, ``blocked`` or ``triton``: the chapter attention that runs."""
    projected: bool
    """Project the chapters' K/V block by block inside the read (:mod:`moc_megatron.kernels.projected`)."""


def resolve_impl(impl: str, query: torch.Tensor) -> str:
    """The implementation ``impl`` stands for on ``query``'s device: ``auto`` is Triton on a GPU, blocked on a CPU.

    ``auto`` falls back to ``blocked`` on a GPU when Triton does not import or the dtype is not
    fp32/fp16/bf16 (the kernel's inputs); an explicit ``triton`` raises instead.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"chapter attention impl must be one of {', '.join(IMPLEMENTATIONS)}, not {impl!r}")
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("chapter attention impl 'triton' (--moc-attention-impl) needs Triton installed")
        if not query.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("chapter attention impl 'triton' (--moc-attention-impl) needs a CUDA GPU "
                               "(or TRITON_INTERPRET=1, for tests); use auto or blocked on a CPU")
    if impl != "auto":
        return impl
    if query.is_cuda and query.dtype in (torch.float32, torch.float16, torch.bfloat16) and triton_available():
        return "triton"
    return "blocked"


def fits_one_block(num_groups: int, head_dim: int, chapter_size: int, selected: torch.Tensor) -> bool:
    """Whether every unit's selected keys and values, copied once, stay within the blocked path's budget
    (``moc_megatron.kernels.blocked.ONE_BLOCK_COPY_ELEMENTS``) and every slot is valid: the blocked path then
    reads them as one fused SDPA."""
    n, k = selected.shape
    copy = 2 * n * k * chapter_size * num_groups * head_dim
    return copy <= blocked.ONE_BLOCK_COPY_ELEMENTS and bool((selected >= 0).all())


def choose_read(impl: str, query: torch.Tensor, selected: torch.Tensor, gating: str, need_lse: bool,
                num_chapters: int, chapter_size: int, bank_dim: int, num_groups: int, head_dim: int) -> ReadChoice:
    """How a read of ``query`` ``[n, u, h, e]`` over ``selected`` ``[n, k]`` of ``num_chapters`` chapters runs.

    - ``impl`` is resolved for the device (:func:`resolve_impl`);
    - ``blocked`` without log-sum-exp under paper gating, when the whole read is one bounded block
      (:func:`fits_one_block`: sequence routing's few long units), runs as ``gather``: one fused SDPA, itself
      a blocked online softmax;
    - otherwise ``blocked`` projects the chapters block by block when those with traffic pass
      ``moc_megatron.kernels.projected.PROJECTION_BLOCK_ELEMENTS`` memory-token elements; ``gather`` and
      ``triton`` project them at once.
    """
    resolved = resolve_impl(impl, query)
    if resolved != "blocked":
        return ReadChoice(resolved, False)
    if gating == "paper" and not need_lse and fits_one_block(num_groups, head_dim, chapter_size, selected):
        return ReadChoice("gather", False)
    return ReadChoice("blocked", num_chapters * chapter_size * bank_dim > projected.PROJECTION_BLOCK_ELEMENTS)
