"""The Hugging Face model's copies of the memory math, checked piece by piece against the Megatron model's code,
so that a difference names the component (router, chapter read, unit pooling) rather than "logits differ"."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from moc_megatron.config import MoCConfig  # noqa: E402
from moc_megatron.hf.configuration_moc import MoCConfig as HFConfig  # noqa: E402
from moc_megatron.hf.modeling_moc import MoCMemoryAttention as HFMemory  # noqa: E402
from moc_megatron.memory.chapter_attention import chapter_attention  # noqa: E402
from moc_megatron.memory.documents import DocumentUnits  # noqa: E402
from moc_megatron.memory.router import ChapterRouter, chapter_weights  # noqa: E402
from moc_megatron.memory.units import RoutingUnits  # noqa: E402

HIDDEN, CHAPTERS, SHARED, TOP_K = 32, 9, 2, 3


def hf_memory(unit: str, gating: str = "paper", reset: bool = False, chunk: int = 4,
              shared: int = SHARED) -> HFMemory:
    config = HFConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, memory_layers=[1], num_chapters=CHAPTERS, chapter_size=4,
                      num_shared_chapters=shared, memory_top_k=TOP_K, memory_num_kv_heads=2, routing_unit=unit,
                      chunk_size=chunk, gating=gating, routed_scaling_factor=2.5, reset_attention_mask=reset)
    torch.manual_seed(0)
    memory = HFMemory(config).double()
    with torch.no_grad():
        memory.router.weight.normal_(0, 0.5)
        memory.router.bias.normal_(0, 0.5)
    return memory


@pytest.mark.parametrize("shared", [0, SHARED])
def test_hf_routing_equals_chapter_router_and_chapter_weights(shared):
    memory = hf_memory("token", shared=shared)
    config = MoCConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, moc_memory_layers=[1],
                       moc_num_chapters=CHAPTERS, moc_num_shared_chapters=shared, moc_top_k=TOP_K,
                       moc_routed_scaling_factor=2.5, use_cpu_initialization=True, params_dtype=torch.float64)
    router = ChapterRouter(config)
    with torch.no_grad():
        router.weight.copy_(memory.router.weight)
        router.bias.copy_(memory.router.bias)
    features = torch.randn(7, HIDDEN, dtype=torch.float64)
    ids, weights = memory._route(features)
    routing = router(features)
    shared_w, routed_w = chapter_weights(routing, config)
    assert torch.equal(ids[:, :shared], torch.arange(shared).expand(7, shared))
    assert torch.equal(ids[:, shared:], routing.chapters + shared)
    torch.testing.assert_close(weights, torch.cat([shared_w, routed_w], dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gating", ["paper", "mixture"])
def test_hf_read_equals_gather_chapter_attention(gating):
    memory = hf_memory("token", gating)
    gen = torch.Generator().manual_seed(1)
    n, u, h, g, e, c, t = 5, 3, 4, 2, 8, 6, 4
    query = torch.randn(n, u, h, e, generator=gen, dtype=torch.float64)
    keys = torch.randn(c, t, g, e, generator=gen, dtype=torch.float64)
    values = torch.randn(c, t, g, e, generator=gen, dtype=torch.float64)
    index = torch.randint(0, c, (n, SHARED + TOP_K), generator=gen)
    weights = torch.rand(n, SHARED + TOP_K, generator=gen, dtype=torch.float64)
    memory.num_heads, memory.head_dim = h, e
    got = memory._read(query, keys, values, index, weights)
    want, _ = chapter_attention(query, keys, values, index, weights, gating, e ** -0.5, need_lse=False, impl="gather")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _features_routed(memory: HFMemory, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """The features the HF memory read hands to its router for ``x`` ``[b, s, hidden]`` (no padding)."""
    seen = []
    route = memory._route
    memory._route = lambda f: (seen.append(f.clone()), route(f))[1]
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    memory(x, real, memory.bank, None, doc_start)
    return torch.cat(seen)


def test_hf_chunk_pooling_equals_the_routing_units():
    memory = hf_memory("chunk", chunk=4)
    memory.bank = _bank(memory)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    got = _features_routed(memory, x)
    want = RoutingUnits("chunk", 4).pool(x.transpose(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unit", ["document", "chunk"])
def test_hf_document_pooling_equals_the_document_layout(unit):
    memory = hf_memory(unit, reset=True, chunk=4)
    memory.bank = _bank(memory)
    document_ids = torch.tensor([[0] * 6 + [1] + [2] * 4, [0] * 11])
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    got = _features_routed(memory, x, starts)
    want = DocumentUnits.build(document_ids, unit, 4).pool(x.transpose(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _bank(memory: HFMemory):
    from moc_megatron.hf.modeling_moc import MoCMemoryBank

    return MoCMemoryBank(memory.config).double()
