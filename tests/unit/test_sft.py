"""Chat SFT data: assistant masks, packing, tools/preprocess_sft.py and SFTDataset."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moc_megatron.data.chat import ChatTemplateError, chat_segments, encode_chat
from moc_megatron.data.packing import FirstFitPacker
from moc_megatron.data.synthetic_corpus import generate_people, synthetic_chats
from moc_megatron.data.tokenizer import build_tokenizer

ASSISTANT_END = {"SentencePieceTokenizer": "<|end|>\n", "HuggingFaceTokenizer": "<|im_end|>\n"}


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    convs = list(synthetic_chats(generate_people(40, seed=3), 60, seed=3))
    # a conversation that starts with the assistant, and one with two assistant turns in a row
    convs.append({"messages": [{"role": "assistant", "content": "Hello! Ask me anything."}]})
    convs.append(
        {
            "messages": [
                {"role": "user", "content": "Tell me two things."},
                {"role": "assistant", "content": "One."},
                {"role": "assistant", "content": "Two, with unicode: café 😀."},
            ]
        }
    )
    return convs


@pytest.fixture(params=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def tokenizer_spec(request, sp_model: str, hf_tokenizer_dir: str) -> tuple[str, str]:
    return request.param, sp_model if request.param == "SentencePieceTokenizer" else hf_tokenizer_dir


def _spans(mask: list[int], value: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` of the maximal runs of ``value`` in ``mask``."""
    spans, start = [], None
    for i, m in enumerate([*mask, None]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_mask_covers_exactly_the_assistant_turns(tokenizer_spec, chats) -> None:
    kind, model = tokenizer_spec
    tok = build_tokenizer(kind, model)
    for conv in chats:
        messages = conv["messages"]
        ids, mask = encode_chat(tok, messages)
        assert len(ids) == len(mask)
        assert tok.detokenize(ids) == tok.apply_chat_template(messages, tokenize=False)
        # one masked span per assistant message, holding exactly what the template emits for it
        expected = [m["content"] + ASSISTANT_END[kind] for m in messages if m["role"] == "assistant"]
        assert [tok.detokenize(ids[a:b]) for a, b in _spans(mask)] == expected
        prompt = "".join(tok.detokenize(ids[a:b]) for a, b in _spans(mask, 0))
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] in prompt
            else:
                assert m["content"] not in prompt


def test_segments_of_default_template(sp_model) -> None:
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    assert chat_segments(tok, messages) == [
        ("<|user|>\nHi<|end|>\n<|assistant|>\n", False),
        ("Hello<|end|>\n", True),
        ("<|user|>\nBye<|end|>\n<|assistant|>\n", False),
        ("Ciao<|end|>\n", True),
    ]
    ids, mask = encode_chat(tok, messages)
    assert [tok.detokenize(ids[a:b]) for a, b in _spans(mask)] == ["Hello<|end|>\n", "Ciao<|end|>\n"]


def test_template_that_rewrites_history_is_refused(sp_model) -> None:
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="prefix-stable"):
        encode_chat(tok, messages, template=template)


def test_first_fit_packer_never_splits_or_overfills() -> None:
    rng = random.Random(0)
    lengths = {i: rng.randint(1, 100) for i in range(500)}
    packer = FirstFitPacker(100)
    samples = []
    for item, length in lengths.items():
        samples.extend(packer.add(item, length))
    samples.extend(packer.flush())
    assert sorted(i for s in samples for i in s) == list(lengths)
    assert all(sum(lengths[i] for i in s) <= 100 for s in samples)
    assert sum(lengths.values()) / (100 * len(samples)) > 0.9
    assert FirstFitPacker(100).add("exact", 100) == [["exact"]]
    with pytest.raises(ValueError):
        packer.add("too long", 101)


def _write_chats(path: Path, convs: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in convs) + "\n")


def _preprocess_sft(run_tool, src, prefix, kind, model, *extra) -> int:
    return run_tool(
        "preprocess_sft",
        "--input", src, "--output-prefix", prefix,
        "--tokenizer-type", kind, "--tokenizer-model", model,
        "--no-progress", *extra,
    )  # fmt: skip


def _stored_conversations(prefix: str) -> tuple[list[list[tuple[tuple, tuple]]], object]:
    """Per sample, its conversations as (tokens, mask) tuples, read straight from the indexed datasets."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, mask = IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_loss_mask")
    docs = tokens.document_indices
    samples = [
        [(tuple(tokens[j].tolist()), tuple(mask[j].tolist())) for j in range(docs[i], docs[i + 1])]
        for i in range(len(docs) - 1)
    ]
    return samples, tokens


def test_preprocess_sft_packing_keeps_conversations_whole(run_tool, tokenizer_spec, chats, tmp_path) -> None:
    kind, model = tokenizer_spec
    tok = build_tokenizer(kind, model)
    src = tmp_path / "chats.jsonl"
    _write_chats(src, chats)
    assert _preprocess_sft(run_tool, src, tmp_path / "plain", kind, model, "--workers", "2") == 0
    assert _preprocess_sft(run_tool, src, tmp_path / "packed", kind, model, "--pack-length", "160") == 0

    plain, _ = _stored_conversations(str(tmp_path / "plain"))
    assert all(len(s) == 1 for s in plain) and len(plain) == len(chats)
    for sample, conv in zip(plain, chats):
        ids, mask = encode_chat(tok, conv["messages"])
        assert sample[0] == (tuple(ids + [tok.eod]), tuple(mask + [0]))

    packed, _ = _stored_conversations(str(tmp_path / "packed"))
    assert all(sum(len(t) for t, _ in s) <= 160 for s in packed)
    assert any(len(s) > 1 for s in packed)
    too_long = [s[0] for s in plain if len(s[0][0]) > 160]
    # every conversation appears exactly once, whole, as one sequence of a packed sample
    assert Counter(c for s in packed for c in s) == Counter(s[0] for s in plain if s[0] not in too_long)
    meta = json.loads((tmp_path / "packed_meta.json").read_text())
    assert meta["pack_length"] == 160 and meta["stats"]["dropped_too_long"] == len(too_long)
    assert meta["chat_template"] == ("default" if kind == "SentencePieceTokenizer" else "tokenizer")


def test_preprocess_sft_drops_too_long_conversations(run_tool, sp_model, chats, tmp_path, capsys) -> None:
    src = tmp_path / "chats.jsonl"
    _write_chats(src, chats)
    code = _preprocess_sft(run_tool, src, tmp_path / "p", "SentencePieceTokenizer", sp_model, "--pack-length", "40")
    assert code == 0
    packed, _ = _stored_conversations(str(tmp_path / "p"))
    dropped = json.loads((tmp_path / "p_meta.json").read_text())["stats"]["dropped_too_long"]
    assert dropped > 0 and sum(len(s) for s in packed) == len(chats) - dropped
    assert f"{dropped} conversations longer than 40 tokens dropped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"messages": "hello"}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0 ('user') has a int 'content'"),
        ('{"messages": [{"content": "x"}]}', "message 0 has no string 'role'"),
        ('{"conversation": []}', "missing key 'messages'"),
        ("{not json", "malformed JSON"),
    ],
)
def test_preprocess_sft_bad_lines(run_tool, sp_model, chats, tmp_path, capsys, line, reason) -> None:
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps(chats[0]) + "\n" + line + "\n" + json.dumps(chats[1]) + "\n")
    out = tmp_path / "out"
    assert _preprocess_sft(run_tool, src, out / "s", "SentencePieceTokenizer", sp_model) == 1
    assert f"{src}:2: {reason}" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert _preprocess_sft(run_tool, src, out / "s", "SentencePieceTokenizer", sp_model, "--skip-bad-lines") == 3
    samples, _ = _stored_conversations(str(out / "s"))
    assert len(samples) == 2


def test_sft_dataset_items(run_tool, sp_model, chats, tmp_path) -> None:
    from moc_megatron.data.sft_dataset import SFTDataset, packed_attention_mask

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    src = tmp_path / "chats.jsonl"
    _write_chats(src, chats)
    prefix = tmp_path / "packed"
    assert _preprocess_sft(run_tool, src, prefix, "SentencePieceTokenizer", sp_model, "--pack-length", "128") == 0
    ds = SFTDataset(str(prefix), seq_length=128)
    samples, _ = _stored_conversations(str(prefix))
    assert len(ds) == len(samples)
    for idx in range(len(ds)):
        item = ds[idx]
        convs = samples[idx]
        raw = [t for c in convs for t in c[0]]
        raw_mask = [m for c in convs for m in c[1]]
        n = len(raw)
        assert item["tokens"].tolist() == (raw + [tok.pad] * 128)[:128]
        assert item["labels"].tolist() == (raw[1:] + [tok.pad] * 128)[:128]
        # loss on a position = its label is an assistant token (conversation starts are never assistant tokens)
        assert item["loss_mask"].tolist() == (raw_mask[1:] + [0] * 128)[:128]
        starts = np.cumsum([0] + [len(c[0]) for c in convs])
        assert item["cu_seqlens"].tolist() == list(starts[:-1]) + [128] * (129 - len(convs))
        assert int(item["num_seqs"]) == len(convs)
        positions = np.concatenate([np.arange(len(c[0])) for c in convs])
        tail = np.arange(128 - n) + len(convs[-1][0])  # padding continues the last conversation
        assert item["position_ids"].tolist() == np.concatenate([positions, tail]).tolist()
        assert int(item["max_seqlen"]) == max(np.diff(list(starts[:-1]) + [128]))
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 128) and batch["cu_seqlens"].shape == (2, 129)
    mask = packed_attention_mask(batch["segment_ids"])
    assert mask.shape == (2, 1, 128, 128)
    s0 = int(ds[0]["cu_seqlens"][1])
    assert bool(mask[0, 0, s0, s0 - 1])  # the second conversation cannot see the first
    assert not bool(mask[0, 0, s0 + 1, s0])


def test_sft_dataset_truncates_and_masks_across_boundaries(run_tool, sp_model, chats, tmp_path) -> None:
    from moc_megatron.data.sft_dataset import SFTDataset

    src = tmp_path / "chats.jsonl"
    _write_chats(src, chats)
    prefix = tmp_path / "packed"
    assert _preprocess_sft(run_tool, src, prefix, "SentencePieceTokenizer", sp_model, "--pack-length", "200") == 0
    short = SFTDataset(str(prefix), seq_length=16)
    item = short[0]
    assert item["tokens"].shape == (16,)
    samples, _ = _stored_conversations(str(prefix))
    raw = [t for c in samples[0] for t in c[0]]
    assert item["tokens"].tolist() == raw[:16] and item["labels"].tolist() == raw[1:17]
    assert item["cu_seqlens"][0] == 0 and int(item["cu_seqlens"][1]) <= 16

    # a loss on a label that starts the next conversation would teach cross-conversation prediction
    long = SFTDataset(str(prefix), seq_length=200)
    for idx in range(len(long)):
        item = long[idx]
        for start in item["cu_seqlens"][1 : int(item["num_seqs"])].tolist():
            assert item["loss_mask"][start - 1] == 0


def test_sft_dataset_requires_matching_files(run_tool, sp_model, chats, tmp_path) -> None:
    from moc_megatron.data.sft_dataset import SFTDataset

    with pytest.raises(ValueError, match="pad_id"):
        SFTDataset(str(tmp_path / "missing"), seq_length=8)
    with pytest.raises(FileNotFoundError):
        SFTDataset(str(tmp_path / "missing"), seq_length=8, pad_id=0)


def test_preprocess_sft_progress_lines(run_tool, sp_model, chats, tmp_path, capsys) -> None:
    src = tmp_path / "chats.jsonl"
    _write_chats(src, chats)
    args = ("--input", src, "--output-prefix", tmp_path / "s", "--tokenizer-type", "SentencePieceTokenizer")
    assert run_tool("preprocess_sft", *args, "--tokenizer-model", sp_model, "--log-interval", "10") == 0
    assert f"Processed {len(chats)} conversations" in capsys.readouterr().err
