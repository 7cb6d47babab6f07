"""Packed documents read as documents: ``document`` routing and ``--reset-attention-mask`` make a window of packed
documents give, document by document, what each document gives alone (float64, forward and backward)."""

from __future__ import annotations

import pytest
import torch

from moc_megatron.config import MoCConfig
from moc_megatron.memory.documents import DocumentUnits, block_causal_mask, document_ids_from_tokens
from moc_megatron.memory.units import RoutingUnits

EOD = 0
VOCAB = 48
# One window of 24 tokens: documents of 5, 1 (just its end-of-document token), 9 and 2 tokens, then a document
# cut by the window edge (7 tokens, no end-of-document token). The second row is one document cut at both ends.
DOC_LENGTHS = [[5, 1, 9, 2, 7], [24]]


def packed_window(seed: int = 0) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """``tokens [2, 24]`` of packed documents and each row's documents (each but a cut one ends with ``EOD``)."""
    gen = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for lengths in DOC_LENGTHS:
        row_docs = []
        for i, n in enumerate(lengths):
            doc = torch.randint(1, VOCAB, (n,), generator=gen)
            if i < len(lengths) - 1:
                doc[-1] = EOD
            row_docs.append(doc)
        rows.append(torch.cat(row_docs))
        docs.append(row_docs)
    return torch.stack(rows), docs


def test_document_ids_follow_megatrons_end_of_document_tokens():
    tokens = torch.tensor([[7, 8, EOD, EOD, 9, 3, EOD, 4]])
    assert document_ids_from_tokens(tokens, EOD).tolist() == [[0, 0, 0, 1, 2, 2, 2, 3]]
    mask = block_causal_mask(document_ids_from_tokens(tokens, EOD))[0, 0]
    assert not mask[2, 0] and mask[3, 2] and not mask[5, 4] and mask[4, 3] and mask[0, 1]


@pytest.mark.parametrize("unit", ["document", "chunk"])
def test_pieces_round_trip_and_pool_per_document(unit):
    tokens, docs = packed_window()
    ids = document_ids_from_tokens(tokens, EOD)
    layout = DocumentUnits.build(ids, unit, 4)
    hidden = torch.randn(24, 2, 6, dtype=torch.float64)
    assert torch.equal(layout.join(layout.split(hidden), 24, 2), hidden)
    pieces = layout.split(hidden)
    assert pieces.shape[:2] == (layout.num_pieces, 4)
    if unit == "document":
        # 6 documents; the 24-token one is 6 pieces, the others ceil(n / 4).
        assert layout.num_units == 6 and layout.num_pieces == 2 + 1 + 3 + 1 + 2 + 6
    feats, start = layout.pool(hidden), 0
    unit_index = 0
    for row, row_docs in enumerate(docs):
        start = 0
        for doc in row_docs:
            alone = hidden[start:start + len(doc), row:row + 1]
            want = RoutingUnits("sequence" if unit == "document" else "chunk", 4).pool(alone)
            got = feats[unit_index:unit_index + want.shape[0]]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            unit_index += want.shape[0]
            start += len(doc)
    assert unit_index == layout.num_units


def _model(unit: str, reset: bool, seed: int = 3):
    from moc_megatron.model.moc_model import MoCGPTModel

    config = MoCConfig(
        num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        moc_memory_layers=[0, 2], moc_num_chapters=9, moc_chapter_size=4, moc_top_k=2, moc_num_heads=4,
        moc_num_query_groups=2, moc_routing_unit=unit, moc_chunk_size=4, moc_load_balance_coeff=0.0,
        moc_z_loss_coeff=0.0, moc_attention_impl="gather", reset_attention_mask=reset,
        use_cpu_initialization=True, params_dtype=torch.float64, bf16=False,
    )
    torch.manual_seed(seed)
    model = MoCGPTModel(config, VOCAB, 64, use_te=False).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random, W_O included (it starts at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3 + (1.0 if p.dim() == 1 else 0))
    return model


def _logits(model, tokens: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None, document_ids=document_ids)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("mcore_world")
@pytest.mark.parametrize("unit, impl", [("document", "gather"), ("document", "blocked"), ("chunk", "gather"),
                                        ("token", "gather")])
def test_packed_documents_give_what_each_document_gives_alone(unit, impl):
    model = _model(unit, reset=True)
    for layer in model.memory_layers():
        layer.config.moc_attention_impl = impl
    tokens, docs = packed_window()
    weights = torch.randn(2, 24, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    model.zero_grad()
    packed = _logits(model, tokens, document_ids_from_tokens(tokens, EOD))
    (packed * weights).sum().backward()
    packed_grads = _grads(model)

    model.zero_grad()
    alone_rows = []
    for row, row_docs in enumerate(docs):
        start, outs = 0, []
        for doc in row_docs:
            out = _logits(model, doc.view(1, -1), torch.zeros(1, len(doc), dtype=torch.long))
            (out * weights[row:row + 1, start:start + len(doc)]).sum().backward()
            outs.append(out[0])
            start += len(doc)
        alone_rows.append(torch.cat(outs))
    alone = torch.stack(alone_rows)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    alone_grads = _grads(model)
    assert packed_grads.keys() == alone_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.usefixtures("mcore_world")
def test_window_routing_mixes_documents_so_the_equivalence_test_can_fail():
    tokens, docs = packed_window()
    for unit, reset in (("sequence", True), ("document", False)):
        model = _model(unit, reset=reset)
        with torch.no_grad():
            packed = _logits(model, tokens, document_ids_from_tokens(tokens, EOD))
            first = _logits(model, docs[0][2].view(1, -1), torch.zeros(1, 9, dtype=torch.long))
        assert not torch.allclose(packed[0, 6:15], first[0], rtol=1e-6, atol=1e-6), (unit, reset)


@pytest.mark.usefixtures("mcore_world")
@pytest.mark.parametrize("unit", ["document", "chunk"])
def test_changing_one_document_changes_no_other(unit):
    model = _model(unit, reset=True)
    tokens, _ = packed_window()
    changed = tokens.clone()
    changed[0, 6:14] = torch.randint(1, VOCAB, (8,), generator=torch.Generator().manual_seed(5))  # the 9-token doc
    with torch.no_grad():
        before = _logits(model, tokens, document_ids_from_tokens(tokens, EOD))
        after = _logits(model, changed, document_ids_from_tokens(changed, EOD))
    assert not torch.allclose(before[0, 6:15], after[0, 6:15])
    # Chunk features are differences of one running sum over the micro-batch: equal to its rounding.
    tol = 0.0 if unit == "document" else 1e-12
    torch.testing.assert_close(before[0, :6], after[0, :6], rtol=0, atol=tol)
    torch.testing.assert_close(before[0, 15:], after[0, 15:], rtol=0, atol=tol)
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=tol)


def test_sft_packs_give_each_conversation_its_own_route():
    """finetune_moc.py's forward step hands the packed conversations' segment ids to the model as documents."""
    from moc_megatron.training.finetune import sft_forward_step

    seen = {}

    class Recorder(torch.nn.Module):
        pre_process = post_process = True

        def forward(self, tokens, positions, mask, labels=None, document_ids=None):
            seen.update(mask=mask, document_ids=document_ids)
            return torch.zeros(tokens.shape, dtype=torch.float32)

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    batch = {"tokens": torch.arange(8).view(1, 8), "labels": torch.arange(8).view(1, 8),
             "loss_mask": torch.ones(1, 8), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]),
             "segment_ids": segments}
    sft_forward_step(iter([batch]), Recorder())
    assert torch.equal(seen["document_ids"], segments)
    assert torch.equal(seen["mask"], block_causal_mask(segments))
