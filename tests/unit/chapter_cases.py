"""Random chapter-attention inputs and the forward+backward comparison shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moc_megatron.memory.chapter_attention import chapter_attention


@dataclass(frozen=True)
class Case:
    """One chapter-attention problem: ``n`` units of ``u`` queries, ``k`` slots over ``c`` chapters of ``t`` tokens."""

    n: int
    u: int
    h: int
    g: int
    e: int
    c: int
    t: int
    k: int
    empty: float = 0.2
    """Fraction of slots set to ``-1``."""
    unit_without_chapter: bool = True
    """Unit 0 has every slot empty (a unit with no local chapter)."""
    hot_chapter: bool = True
    """Slot 0 of every unit reads chapter 0 (a chapter read by many units)."""

    def __str__(self) -> str:
        return f"n{self.n}-u{self.u}-h{self.h}g{self.g}-e{self.e}-c{self.c}-t{self.t}-k{self.k}"


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    """``(query, keys, values, selected, weights)``; distinct chapters per unit, some slots empty."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.n, case.u, case.h, case.e, generator=gen)
    keys = torch.randn(case.c, case.t, case.g, case.e, generator=gen)
    values = torch.randn(case.c, case.t, case.g, case.e, generator=gen)
    selected = torch.stack([torch.randperm(case.c, generator=gen)[: case.k] for _ in range(case.n)])
    if case.hot_chapter:
        hot = selected == 0
        selected[hot] = selected[:, :1].expand_as(selected)[hot]  # keep chapters distinct within a unit
        selected[:, 0] = 0
    selected[torch.rand(case.n, case.k, generator=gen) < case.empty] = -1
    if case.unit_without_chapter:
        selected[0] = -1
    weights = torch.rand(case.n, case.k, generator=gen) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    out = (q, keys, values, selected, weights)
    return tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in out)


def forward_backward(impl, inputs, gating: str, scale: float = 0.37, lse_grad: bool = True):
    """``impl`` is a name for :func:`chapter_attention` or a function with its positional arguments.

    Output, log-sum-exp and the gradients of query, keys, values and weights under a random loss.

    The loss also reads the log-sum-exp (as the expert-parallel merge does), so its gradient path is checked.
    """
    q, keys, values, selected, weights = (x.detach().clone() for x in inputs)
    leaves = [q, keys, values, weights]
    for x in leaves:
        x.requires_grad_(True)
    if callable(impl):
        out, lse = impl(q, keys, values, selected, weights, gating, scale)
    else:
        out, lse = chapter_attention(q, keys, values, selected, weights, gating, scale, impl=impl)
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(out.shape, generator=gen).to(out)
    loss = (out.float() * probe.float()).sum()
    if lse is not None and lse_grad:
        probe_lse = torch.randn(lse.shape, generator=gen).to(lse)
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * probe_lse).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return (out.detach(), None if lse is None else lse.detach(), *grads)


FORWARD_BACKWARD_NAMES = ("out", "lse", "dq", "dkeys", "dvalues", "dweights")


def assert_same(got, want, atol: float = 1e-5, rtol: float = 1e-5, names=FORWARD_BACKWARD_NAMES) -> None:
    """``got`` and ``want`` (by default from :func:`forward_backward`) agree elementwise, ``-inf`` included.

    Half-precision tensors are compared in fp32; fp32 and fp64 at their own precision.
    """
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: -inf pattern differs"
        fin = ~torch.isinf(b)
        up = torch.promote_types(b.dtype, torch.float32)
        torch.testing.assert_close(a[fin].to(up), b[fin].to(up), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
