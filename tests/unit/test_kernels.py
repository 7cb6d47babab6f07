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
from moc_megatron.kernels.choice import resolve_impl
from moc_megatron.memory.chapter_attention import chapter_attention, merge_partials

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


def _small_memory_layer(unit: str, gating: str):
    """A one-layer memory read (shared + routed chapters, GQA memory heads) with a non-zero W_O and router bias."""
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
    return config, module


def _layer_forward_backward(config, module, impl: str, hidden: torch.Tensor, probe: torch.Tensor,
                            document_ids: torch.Tensor | None = None) -> list:
    """Output, input gradient and every parameter gradient of ``module`` with ``impl``."""
    config.moc_attention_impl = impl
    x = hidden.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out, _ = module(x, key_value_states=document_ids)
    (out * probe).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.usefixtures("mcore_world")
@pytest.mark.parametrize("unit", ["sequence", "chunk", "token", "document", "chunk-in-documents"])
@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_memory_layer_same_with_every_impl(unit, gating):
    """The whole memory read (shared + routed chapters, GQA memory heads) with each impl against gather; with
    documents, ragged documents (one of a single token) read in 5-token pieces."""
    config, module = _small_memory_layer(unit.split("-")[0], gating)
    documents = None
    if unit in ("document", "chunk-in-documents"):
        config.reset_attention_mask = True
        documents = torch.tensor([[0] * 3 + [1] + [2] * 8, [0] * 12])
    hidden = torch.randn(12, 2, 32)
    probe = torch.randn(12, 2, 32)
    impls = ["gather", "blocked"] + (["triton"] if INTERPRETED else [])
    results = {impl: _layer_forward_backward(config, module, impl, hidden, probe, documents) for impl in impls}
    for impl in impls[1:]:
        for got, want in zip(results[impl], results["gather"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- the layer's read with the K/V projection inside the blocks (moc_megatron/kernels/projected.py) ---------


def _projected_problem(case: Case, seed: int = 0, dtype=torch.float32):
    """Query, weights, selection over 2 shared + ``case.c`` routed chapters (a shuffled subset of a larger bank),
    and the modules that project them."""
    from moc_megatron.kernels.projected import ChapterSource

    q, _, _, selected, weights = make_inputs(Case(**{**case.__dict__, "c": case.c + 2}), dtype, seed=seed)
    d = 24
    gen = torch.Generator().manual_seed(seed + 7)
    shared = torch.nn.Parameter(torch.randn(2, case.t, d, generator=gen, dtype=dtype))
    routed = torch.nn.Parameter(torch.randn(case.c + 5, case.t, d, generator=gen, dtype=dtype))
    ids = torch.randperm(case.c + 5, generator=gen)[: case.c]
    norms = [torch.nn.RMSNorm(d, dtype=dtype), torch.nn.RMSNorm(d, dtype=dtype)]
    lk = torch.nn.Linear(d, case.g * case.e, bias=False, dtype=dtype)
    lv = torch.nn.Linear(d, case.g * case.e, bias=False, dtype=dtype)
    with torch.no_grad():
        for m in (*norms, lk, lv):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=dtype) * 0.3 + (1.0 if m in norms else 0))

    def project(tokens):
        c, t, _ = tokens.shape
        return lk(tokens).view(c, t, case.g, case.e), lv(tokens).view(c, t, case.g, case.e)

    sources = [ChapterSource(shared, torch.arange(2), norms[0]), ChapterSource(routed, ids, norms[1])]
    params = [lk.weight, lv.weight, norms[0].weight, norms[1].weight]
    return q, weights, selected, sources, project, params, [shared, routed]


def _projected_run(fn, problem, gating, need_lse=True):
    """Output, log-sum-exp and the gradients of query, weights, banks and module parameters under a random loss."""
    q, weights, selected, sources, project, params, banks = problem
    q = q.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    for p in params + banks:
        p.grad = None
    out, lse = fn(q, weights, selected, sources, project, params, gating)
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if lse is not None and need_lse:
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * torch.randn(lse.shape, generator=gen)).sum()
    loss.backward()
    grads = [x.grad.clone() if x.grad is not None else torch.zeros_like(x) for x in [q, weights, *banks, *params]]
    return [out.detach(), None if lse is None else lse.detach(), *grads]


def _projected_reference(q, weights, selected, sources, project, params, gating):
    """Every chapter projected at once (the one-projection path), then the gather reference."""
    tokens = torch.cat([s.norm(s.bank[s.ids]) for s in sources])
    keys, values = project(tokens)
    return chapter_attention(q, keys, values, selected, weights, gating, 0.37, impl="gather")


def _projected(projection_budget, read_budget=1 << 22):
    from moc_megatron.kernels.projected import projected_chapter_attention

    def run(q, weights, selected, sources, project, params, gating):
        return projected_chapter_attention(q, weights, selected, sources, project, params, gating, 0.37,
                                           read_budget=read_budget, projection_budget=projection_budget)

    return run


PROJECTED_NAMES = ["out", "lse", "dq", "dweights", "dshared_bank", "drouted_bank", "dW_K", "dW_V", "dshared_norm",
                   "drouted_norm"]


PROJECTED_CASES = [("one-chapter", n) for n in ("chunk-ragged", "token-gqa", "t12-token")] + [
    ("three-chapters-hot-split", n) for n in ("sequence-gqa", "chunk-ragged", "token-gqa", "k64", "t12-token")] + [
    ("all", n) for n in ("sequence-gqa", "token-gqa")] + [
    ("unit-major", n) for n in ("sequence-gqa", "chunk-ragged", "k64")]


@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("blocks, name", PROJECTED_CASES, ids=[f"{b}-{n}" for b, n in PROJECTED_CASES])
def test_projected_read_matches_gather(name, gating, blocks, monkeypatch):
    """Projection blocks of 1 or 3 chapters (tiles of 2 pairs, tiny read budget) or all chapters, read chapter-major,
    or blocks of 3 chapters read unit by unit (the schedule of units of >= 128 queries), against gather."""
    from moc_megatron.kernels import chapter_major, projected

    case = CASES[name]
    problem = _projected_problem(case)
    per_chapter = case.t * 24
    budget = {"one-chapter": per_chapter, "three-chapters-hot-split": 3 * per_chapter, "all": 1 << 30,
              "unit-major": 3 * per_chapter}[blocks]
    read_budget = 1 << 22
    if blocks == "unit-major":
        monkeypatch.setattr(projected, "CHAPTER_MAJOR_QUERIES", 1)
        read_budget = 3000
    if blocks == "three-chapters-hot-split":
        monkeypatch.setattr(chapter_major, "TILE_PAIRS", 2)  # the hot chapter 0 gets several tiles
        read_budget = 3000  # several tile groups / unit blocks per projection block
    want = _projected_run(_projected_reference, problem, gating)
    got = _projected_run(_projected(budget, read_budget), problem, gating)
    assert want[4].abs().sum() > 0 and want[5].abs().sum() > 0 and want[8].abs().sum() > 0
    assert_same(got, want, names=PROJECTED_NAMES)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_projected_read_float64_exact(gating):
    problem = _projected_problem(CASES["token-gqa"], dtype=torch.float64)
    want = _projected_run(_projected_reference, problem, gating)
    got = _projected_run(_projected(8 * 24), problem, gating)
    assert_same(got, want, atol=1e-12, rtol=1e-12, names=PROJECTED_NAMES)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
@pytest.mark.parametrize("name", ["chunk-ragged", "token-gqa"])
def test_projected_partials_from_two_owners_merge_to_the_full_read(name, gating):
    """Expert parallelism: each owner reads its own chapters block by block; the merged partials are the full read."""
    case = Case(**{**CASES[name].__dict__, "empty": 0.0, "unit_without_chapter": False})
    q, weights, selected, sources, project, params, banks = _projected_problem(case, seed=4)
    problem = (q, weights, selected, sources, project, params, banks)
    want = _projected_run(_projected_reference, problem, gating, need_lse=False)
    read = _projected(case.t * 24)

    def split(q, weights, selected, sources, project, params, gating):
        owner = selected % 2
        parts = [read(q, weights, torch.where(owner == r, selected, -1), sources, project, params, gating)
                 for r in range(2)]
        lses = None if gating == "mixture" else torch.cat([p[1] for p in parts])
        index = torch.arange(q.shape[0]).repeat(2)
        return merge_partials(torch.cat([p[0] for p in parts]), lses, index, q.shape[0]), None

    got = _projected_run(split, problem, gating)
    assert_same(got[:1] + got[2:], want[:1] + want[2:], names=PROJECTED_NAMES[:1] + PROJECTED_NAMES[2:])


def test_projected_read_projects_bounded_blocks_and_fires_each_accumulator_once():
    """At most one block of chapters is projected at a time (forward, then again in backward), the bank's rows land
    in megatron DDP's main_grad, and every parameter's gradient accumulator fires once (DDP's grad-ready hook)."""
    case = CASES["token-gqa"]
    q, weights, selected, sources, project, params, banks = _projected_problem(case)
    sizes = []

    def counting_project(tokens):
        sizes.append(tokens.shape[0])
        return project(tokens)

    want = _projected_run(_projected_reference, (q, weights, selected, sources, project, params, banks), "paper")
    routed = banks[1]
    routed.main_grad = torch.zeros_like(routed)
    routed.grad_added_to_main_grad = False
    fired = {}
    keep = []
    for i, p in enumerate(params + banks):
        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(lambda *_, i=i: fired.__setitem__(i, fired.get(i, 0) + 1))
        keep.append(acc)
    got = _projected_run(_projected(3 * case.t * 24), (q, weights, selected, sources, counting_project, params, banks),
                         "paper")
    blocks_per_pass = 1 + -(-case.c // 3)  # the shared chapters are one block, the routed ones 3 at a time
    assert len(sizes) == 2 * blocks_per_pass and max(sizes) <= 3
    assert routed.grad_added_to_main_grad
    torch.testing.assert_close(routed.main_grad, want[5], atol=1e-5, rtol=1e-5)
    # W_K, W_V, both norms and the routed bank (main_grad: a placeholder keeps DDP's hook firing) fire once each.
    assert [fired.get(i) for i in range(len(params))] == [1] * len(params) and fired.get(len(params) + 1) == 1, fired
    assert_same(got[:5] + got[6:], want[:5] + want[6:], names=PROJECTED_NAMES[:5] + PROJECTED_NAMES[6:])
    del routed.main_grad, routed.grad_added_to_main_grad


@pytest.mark.usefixtures("mcore_world")
@pytest.mark.parametrize("unit", ["sequence", "chunk", "token"])
@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_memory_layer_projected_read_matches_gather(unit, gating, monkeypatch):
    """The whole layer with the blocked path's projection blocks of two chapters (megatron's linears, RMSNorms,
    router, shared + routed chapters, GQA) against gather: output and every gradient."""
    from moc_megatron.kernels import blocked, projected

    config, module = _small_memory_layer(unit, gating)
    with torch.no_grad():
        module.routed_norm.weight.normal_(1, 0.2)
        module.shared_norm.weight.normal_(1, 0.2)
    hidden = torch.randn(12, 2, 32)
    probe = torch.randn(12, 2, 32)
    calls = []
    original = projected._ProjectedRead.forward
    monkeypatch.setattr(projected._ProjectedRead, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    monkeypatch.setattr(projected, "PROJECTION_BLOCK_ELEMENTS", 2 * 8 * 32)
    monkeypatch.setattr(blocked, "ONE_BLOCK_COPY_ELEMENTS", 0)  # else sequence routing reads as one SDPA block
    if unit == "sequence":  # sequence units read unit by unit (their schedule at >= 128 queries), others chapter-major
        monkeypatch.setattr(projected, "CHAPTER_MAJOR_QUERIES", 1)
    results = {impl: _layer_forward_backward(config, module, impl, hidden, probe) for impl in ("gather", "blocked")}
    assert calls == [1], "the blocked path should have projected block by block"
    names = ["out", "input"] + [n for n, _ in module.named_parameters()]
    assert_same(results["blocked"], results["gather"], names=names)
