"""Documents in the Hugging Face export: ``document`` routing and ``--reset-attention-mask`` travel with the export,
and the exported model gives Megatron's logits on packed input and on one document per row."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from moc_megatron.checkpoint import layout as meta  # noqa: E402
from moc_megatron.hf.export import ExportOptions, export_checkpoint  # noqa: E402
from moc_megatron.hf.importer import ImportOptions, import_checkpoint  # noqa: E402
from moc_megatron.memory.documents import document_ids_from_tokens  # noqa: E402
from moc_megatron.platform.megatron_versions import read_common_state  # noqa: E402

EOD = 0  # a run without a tokenizer ends documents with id 0
VARIANTS = {
    "document-separated": ["--moc-routing-unit", "document", "--reset-attention-mask"],
    "document-mixture-perlayer": ["--moc-routing-unit", "document", "--moc-gating", "mixture",
                                  "--no-moc-shared-bank"],
    "chunk-separated": ["--moc-routing-unit", "chunk", "--reset-attention-mask"],
    "token-separated": ["--moc-routing-unit", "token", "--reset-attention-mask"],
}
quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mcore_world):
    """name -> (Megatron model, exported folder)."""
    out = {}
    for name, flags in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        model, args, config, settings = H.megatron_model(flags, seed=len(out) + 20)
        H.save_checkpoint(str(root / "ckpt"), model, args, config, settings)
        export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(root / "hf"), max_shard_size="40KB"),
                          log=quiet)
        out[name] = (model, str(root / "hf"))
    return out


def packed_tokens() -> torch.Tensor:
    """Two rows of 20 tokens: ragged documents, a one-token document, documents cut by the row's edges."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(1, H.VOCAB, (2, 20), generator=gen)
    for row, ends in ((0, (4, 5, 13)), (1, (9,))):
        x[row, list(ends)] = EOD
    return x


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None, document_ids=document_ids_from_tokens(tokens, EOD))


def test_the_routing_unit_and_document_separation_travel_with_the_export(exported, tmp_path):
    _, folder = exported["document-separated"]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert (config["routing_unit"], config["reset_attention_mask"], config["document_separator_id"]) == \
        ("document", True, EOD)
    import_checkpoint(ImportOptions(hf=folder, save=str(tmp_path / "ckpt")), log=quiet)
    common = read_common_state(meta.checkpoint_path(str(tmp_path / "ckpt"), 0))
    signature = common["model_signature"]
    assert signature["moc_routing_unit"] == "document" and signature["reset_attention_mask"] is True
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "again"),
                                    max_shard_size="40KB"), log=quiet)
    assert H.shard_bytes(folder) == H.shard_bytes(str(tmp_path / "again"))
    assert json.load(open(tmp_path / "again" / "config.json"))["routing_unit"] == "document"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_logits_equal_megatron_logits_on_packed_documents(exported, name):
    model, folder = exported[name]
    x = packed_tokens()
    want = megatron_logits(model, x)
    hf = H.load_hf(folder)
    with torch.no_grad():
        got = hf(x).logits
    assert (got - want).abs().max() <= 1e-4
    # The documents matter: read as one sequence per row, Megatron gives other logits.
    positions = torch.arange(x.shape[1]).expand_as(x)
    with torch.no_grad():
        window = model(x, positions, None)
    assert (window - want).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["document-separated", "chunk-separated"])
def test_one_document_per_row_with_padding_equals_each_document_alone(exported, name):
    model, folder = exported[name]
    hf = H.load_hf(folder)
    lengths = [11, 5, 8]
    docs = [torch.randint(1, H.VOCAB, (n,), generator=torch.Generator().manual_seed(30 + n)) for n in lengths]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, 11 - len(d):], mask[i, 11 - len(d):] = d, 1
    with torch.no_grad():
        batch = hf(ids, attention_mask=mask).logits
        for i, d in enumerate(docs):
            want = megatron_logits(model, d[None])[0]
            assert (batch[i, 11 - len(d):] - want).abs().max() <= 1e-4, i


def test_chunk_routing_within_documents_decodes_exactly_with_the_cache(exported):
    """Causal routing: generating with the cache, across document ends, equals full forwards."""
    hf = H.load_hf(exported["chunk-separated"][1])
    prompt = packed_tokens()[:, :11]  # row 0 ends two documents inside the prompt
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                      pad_token_id=EOD, eos_token_id=None)
    seq = prompt
    with torch.no_grad():
        for step in range(9):
            logits = hf(seq, use_cache=False).logits[:, -1]
            if step == 3:  # force a document end while decoding: the next token starts a new document
                logits[:, EOD] = logits.max() + 1
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    forced = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                         pad_token_id=EOD, eos_token_id=None,
                         logits_processor=[_ForceAt(prompt.shape[1] + 3, EOD)])
    assert torch.equal(forced, seq)
    assert not torch.equal(got, seq)  # the forced end changed the continuation


class _ForceAt:
    """A logits processor that makes token ``token`` the choice at sequence length ``length``."""

    def __init__(self, length: int, token: int) -> None:
        self.length, self.token = length, token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.length:
            scores = scores.clone()
            scores[:, self.token] = scores.max() + 1
        return scores


def test_document_routing_keeps_a_documents_route_while_decoding(exported):
    """With a cache, a document keeps the route of its prompt part (as sequence routing does, docs/hf.md);
    the prompt's own logits are exact."""
    model, folder = exported["document-separated"]
    hf = H.load_hf(folder)
    prompt = packed_tokens()[:1, :12]
    with torch.no_grad():
        first = hf(prompt, use_cache=True)
        torch.testing.assert_close(first.logits, megatron_logits(model, prompt), rtol=0, atol=1e-4)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        routed = cache._moc_memory[0]["ids"].clone()
        hf(first.logits[:, -1:].argmax(-1), cache=cache, past_key_values=cache, use_cache=True)
        assert torch.equal(cache._moc_memory[0]["ids"], routed)
