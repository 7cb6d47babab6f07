"""The blocked PyTorch path and the Triton kernel (under TRITON_INTERPRET=1) against the gather reference.

Forward and backward (query, keys, values, chapter weights, and the gradient reaching the log-sum-exp as
the expert-parallel merge sends it), both gatings, query counts of sequence / chunk / token units, GQA,
ragged sizes, empty slots, a unit with no chapter here, a chapter read by every unit, k from 1 to 64 and
T from 8 to 128.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from chapter_cases import Case, assert_same, forward_backward, make_inputs

from moc_megatron.kernels import triton_available
from moc_megatron.kernels.blocked import block_sizes, blocked_chapter_attention
from moc_megatron.memory.chapter_attention import chapter_attention, merge_partials, resolve_impl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (set by conftest)")

CASES = {
    # many queries per unit (sequence-like), GQA 2:1, ragged query count
    "sequence-gqa": Case(n=3, u=24, h=4, g=2, e=16, c=9, t=8, k=3),
    # chunk-like: a few queries per unit, T=16
    "chunk-ragged": Case(n=5, u=5, h=2, g=2, e=8, c=12, t=16, k=4),
    # token units: one query each, many units per chapter, GQA 2:1
    "token-gqa": Case(n=12, u=1, h=2, g=1, e=16, c=10, t=8, k=5),
    "k1": Case(n=4, u=3, h=2, g=2, e=8, c=5, t=8, k=1, empty=0.0),
    "k64": Case(n=2, u=2, h=1, g=1, e=16, c=70, t=8, k=64),
    "t128": Case(n=3, u=2, h=2, g=1, e=16, c=4, t=128, k=2),
    "t12-token": Case(n=9, u=1, h=3, g=3, e=12, c=7, t=12, k=3),
}


@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("budget", [3000, 1 << 22], ids=["small-blocks", "default"])
def test_blocked_matches_gather(name, gating, budget):
    inputs = make_inputs(CASES[name])
    want = forward_backward("gather", inputs, gating)
    got = forward_backward(functools.partial(blocked_chapter_attention, block_elements=budget), inputs, gating)
    assert_same(got, want)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("name", ["sequence-gqa", "token-gqa", "chunk-ragged"])
def test_blocked_one_pair_blocks_float64(name, gating):
    """Blocks of one unit and one chapter (the smallest budget), in float64 to rounding."""
    inputs = make_inputs(CASES[name], torch.float64)
    want = forward_backward("gather", inputs, gating)
    got = forward_backward(functools.partial(blocked_chapter_attention, block_elements=1), inputs, gating)
    assert_same(got, want, atol=1e-12, rtol=1e-12)


def test_block_sizes_respect_the_budget():
    n, u, h, g, e, k, t = 64, 1, 12, 12, 64, 65, 64
    for budget in (1, 10_000, 1 << 20, 1 << 22):
        nb, kb = block_sizes(n, u, h, g, e, k, t, budget)
        assert 1 <= nb <= n and 1 <= kb <= k
        per_pair = t * (2 * g * e + 2 * h * u)
        assert nb * kb * per_pair <= max(budget, per_pair)


def test_blocked_never_gathers_more_than_one_block(monkeypatch):
    """Forward and backward gather at most one budget's worth of (unit, chapter) pairs at a time."""
    from moc_megatron.kernels import blocked

    case = CASES["token-gqa"]
    budget = 3000
    per_pair = case.t * (2 * case.g * case.e + 2 * case.h * case.u)
    seen = []
    original = blocked._Block.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        nb, kb = self.shape[:2]
        seen.append(nb * kb)

    monkeypatch.setattr(blocked._Block, "__init__", spy)
    inputs = make_inputs(case)
    forward_backward(functools.partial(blocked_chapter_attention, block_elements=budget), inputs, "paper")
    assert len(seen) > 2 and max(seen) * per_pair <= budget
    assert sum(seen) == 2 * case.n * case.k  # every (unit, slot) pair once in forward, once in backward


@needs_interpreter
@pytest.mark.parametrize("schedule", ["unit", "chapter"])
@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_gather(name, gating, schedule):
    from moc_megatron.kernels.triton_chapter_attention import triton_chapter_attention

    inputs = make_inputs(CASES[name])
    want = forward_backward("gather", inputs, gating)
    got = forward_backward(functools.partial(triton_chapter_attention, schedule=schedule), inputs, gating)
    assert_same(got, want)


@needs_interpreter
def test_triton_default_schedule_and_empty_local_chapters():
    """Token units pick the chapter-major schedule; a rank with no local chapter returns zeros and -inf."""
    from moc_megatron.kernels import triton_chapter_attention as tca

    inputs = make_inputs(CASES["token-gqa"])
    calls = []
    original = tca._forward_chapter_major

    def spy(*args):
        calls.append(1)
        return original(*args)

    tca._forward_chapter_major = spy
    try:
        forward_backward("triton", inputs, "paper")
    finally:
        tca._forward_chapter_major = original
    assert calls, "one query per unit should run chapter-major"

    q, keys, values, selected, weights = inputs
    none_here = torch.full_like(selected, -1)
    for impl in ("triton", "blocked"):
        out, lse = chapter_attention(q, keys[:0], values[:0], none_here, weights, "paper", 0.5, impl=impl)
        assert out.abs().max() == 0 and torch.isinf(lse).all()


@pytest.mark.parametrize("impl", ["blocked", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_partials_from_two_owners_merge_to_the_full_read(impl, gating):
    """The expert-parallel contract: per-owner partials merged by log-sum-exp equal one read of all chapters."""
    case = Case(n=6, u=3, h=2, g=1, e=16, c=8, t=8, k=4, empty=0.0, unit_without_chapter=False)
    q, keys, values, selected, weights = make_inputs(case, seed=3)
    want = forward_backward("gather", (q, keys, values, selected, weights), gating, lse_grad=False)

    def split_read(q, keys, values, selected, weights, gating, scale):
        owner = selected % 2
        parts = [chapter_attention(q, keys, values, torch.where(owner == r, selected, -1), weights, gating, scale,
                                   impl=impl) for r in range(2)]
        outs = torch.cat([p[0] for p in parts])
        lses = None if gating == "mixture" else torch.cat([p[1] for p in parts])
        index = torch.arange(q.shape[0]).repeat(2)
        return merge_partials(outs, lses, index, q.shape[0]), None

    got = forward_backward(split_read, (q, keys, values, selected, weights), gating)
    assert_same(got[:1] + (None,) + got[2:], want[:1] + (None,) + want[2:])


def test_impl_switch_resolution_and_errors(monkeypatch):
    q = torch.zeros(1, 1, 1, 16)
    assert resolve_impl("auto", q) == "blocked"  # CPU tensors
    assert resolve_impl("gather", q) == "gather"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fused", q)
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            resolve_impl("triton", q)


@pytest.mark.usefixtures("mcore_world")
@pytest.mark.parametrize("unit", ["sequence", "chunk", "token"])
@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_memory_layer_same_with_every_impl(unit, gating):
    """The whole memory read (shared + routed chapters, GQA memory heads) with each impl against gather."""
    from moc_megatron.config import MoCConfig
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

    config = MoCConfig(num_layers=1, hidden_size=32, num_attention_heads=4, moc_memory_layers=[0],
                       moc_num_chapters=9, moc_num_shared_chapters=1, moc_top_k=3, moc_chapter_size=8,
                       moc_num_query_groups=2, moc_shared_bank=False, moc_routing_unit=unit, moc_chunk_size=5,
                       moc_gating=gating, use_cpu_initialization=True)
    torch.manual_seed(0)
    module = MoCMemoryAttention(config, layer_number=1).eval()
    with torch.no_grad():
        module.linear_o.weight.normal_(0, 0.2)
        module.router.bias.normal_(0, 0.5)
    hidden = torch.randn(12, 2, 32)
    probe = torch.randn(12, 2, 32)
    impls = ["gather", "blocked"] + (["triton"] if INTERPRETED else [])
    results = {}
    for impl in impls:
        config.moc_attention_impl = impl
        x = hidden.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        out, _ = module(x)
        (out * probe).sum().backward()
        results[impl] = [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]
    for impl in impls[1:]:
        for got, want in zip(results[impl], results["gather"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
