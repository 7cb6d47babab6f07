"""tools/preprocess_data.py: round trip through IndexedDataset, determinism across workers and partitions."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from moc_megatron.data.indexed import optimal_dtype
from moc_megatron.data.jsonl import Segment, iter_chunks, plan_partitions
from moc_megatron.data.tokenizer import build_tokenizer


def _preprocess(run_tool, input_path, prefix, model, *extra, tokenizer_type="SentencePieceTokenizer") -> int:
    return run_tool(
        "preprocess_data",
        "--input", input_path,
        "--output-prefix", prefix,
        "--tokenizer-type", tokenizer_type,
        "--tokenizer-model", model,
        "--no-progress",
        *extra,
    )  # fmt: skip


def _read(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def test_round_trip_gives_the_text_back(run_tool, tiny_corpus, tiny_texts, sp_model, tmp_path) -> None:
    prefix = tmp_path / "out" / "corpus"
    assert _preprocess(run_tool, tiny_corpus, prefix, sp_model, "--append-eod", "--workers", "2") == 0
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    ds = _read(f"{prefix}_text_document")
    assert len(ds) == len(tiny_texts)
    assert np.array_equal(ds.document_indices, np.arange(len(tiny_texts) + 1))
    assert ds[0].dtype == np.uint16
    for i, text in enumerate(tiny_texts):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1].tolist()) == text


def test_without_append_eod_tokens_equal_tokenize(run_tool, tiny_corpus, tiny_texts, sp_model, tmp_path) -> None:
    prefix = tmp_path / "noeod"
    assert _preprocess(run_tool, tiny_corpus, prefix, sp_model) == 0
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    ds = _read(f"{prefix}_text_document")
    for i in (0, 7, len(tiny_texts) - 1):
        assert ds[i].tolist() == tok.tokenize(tiny_texts[i])


def _write_split_corpus(folder: Path, texts: list[str]) -> None:
    """The texts over three files in a folder: plain, gzip, and plain without a final newline."""
    folder.mkdir()
    parts = [texts[:100], texts[100:180], texts[180:]]
    lines = [[json.dumps({"text": t}) for t in part] for part in parts]
    (folder / "a.jsonl").write_text("\n".join(lines[0]) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[1]) + "\n")
    (folder / "c.jsonl").write_text("\n".join(lines[2]))  # no trailing newline
    (folder / "ignored.txt").write_text("not jsonl")


@pytest.mark.parametrize(("workers", "partitions"), [(2, 1), (3, 3), (4, 2)])
def test_workers_and_partitions_give_identical_files(
    run_tool, tiny_texts, sp_model, tmp_path, workers: int, partitions: int
) -> None:
    folder = tmp_path / "in"
    _write_split_corpus(folder, tiny_texts)
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    small_chunks = ("--chunk-bytes", "2000", "--append-eod")
    assert _preprocess(run_tool, folder, ref, sp_model, "--workers", "1", *small_chunks) == 0
    extra = ("--workers", str(workers), "--partitions", str(partitions))
    assert _preprocess(run_tool, folder, out, sp_model, *extra, *small_chunks) == 0
    for suffix in (".bin", ".idx"):
        a = Path(f"{ref}_text_document{suffix}").read_bytes()
        b = Path(f"{out}_text_document{suffix}").read_bytes()
        assert a == b, suffix
    assert len(_read(f"{ref}_text_document")) == len(tiny_texts)


def test_workers_must_divide_into_partitions(run_tool, tiny_corpus, sp_model, tmp_path, capsys) -> None:
    assert _preprocess(run_tool, tiny_corpus, tmp_path / "x", sp_model, "--workers", "3", "--partitions", "2") == 1
    assert "multiple of --partitions" in capsys.readouterr().err


def test_partition_plan_covers_every_line_once(tmp_path) -> None:
    rng = random.Random(0)
    files = []
    expected = []
    for i in range(4):
        lines = [f"line {i}-{j} " + "x" * rng.randint(0, 300) for j in range(rng.randint(0, 40))]
        expected.extend(lines)
        path = tmp_path / f"f{i}.jsonl" if i != 2 else tmp_path / "f2.jsonl.gz"
        data = ("\n".join(lines) + ("\n" if lines and i != 3 else "")).encode()
        if i == 2:
            with gzip.open(path, "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)
        files.append(str(path))
    for partitions in (1, 2, 3, 7, 50):
        plan = plan_partitions(files, partitions)
        assert len(plan) == partitions
        got = []
        for segments in plan:
            for chunk, _ in iter_chunks(segments, chunk_bytes=rng.randint(1, 500)):
                got.extend(chunk.data.decode().split("\n")[:-1])
        assert got == expected, partitions


def test_segment_line_numbers(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a\nbb\nccc\ndddd\n")
    assert Segment(str(path), 5).first_line_number() == 3
    chunks = list(iter_chunks([Segment(str(path), 5)], chunk_bytes=1))
    assert [(c.first_line, c.data) for c, _ in chunks] == [(0, b"ccc\n"), (1, b"dddd\n")]


def test_several_json_keys_and_empty_documents(run_tool, sp_model, tmp_path, capsys) -> None:
    rows = [
        {"text": "first body", "title": "First"},
        {"text": "", "title": "Empty body"},
        {"text": "third body", "title": ""},
        {"text": "fourth body", "title": "Fourth"},
    ]
    src = tmp_path / "keys.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n   \n")
    prefix = tmp_path / "keys"
    assert _preprocess(run_tool, src, prefix, sp_model, "--json-keys", "text", "title", "--append-eod") == 0
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    texts = [tok.detokenize(d[:-1].tolist()) for d in _read(f"{prefix}_text_document")]
    titles = [tok.detokenize(d[:-1].tolist()) for d in _read(f"{prefix}_title_document")]
    assert texts == ["first body", "third body", "fourth body"]
    assert titles == ["First", "Empty body", "Fourth"]
    err = capsys.readouterr().err
    assert "text: 3 documents written, 1 empty documents dropped" in err
    assert "title: 3 documents written, 1 empty documents dropped" in err
    assert "2 blank lines ignored" in err


def test_huggingface_tokenizer(run_tool, tiny_corpus, tiny_texts, hf_tokenizer_dir, tmp_path) -> None:
    prefix = tmp_path / "hf"
    code = _preprocess(
        run_tool, tiny_corpus, prefix, hf_tokenizer_dir, "--append-eod", tokenizer_type="HuggingFaceTokenizer"
    )
    assert code == 0
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    ds = _read(f"{prefix}_text_document")
    assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(len(ds))] == tiny_texts


def test_dtype_rule_matches_megatron() -> None:
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (300, 65499, 65500, 128_000):
        assert optimal_dtype(vocab) == DType.optimal_dtype(vocab)


def test_overwrites_previous_outputs(run_tool, tiny_corpus, sp_model, tmp_path) -> None:
    prefix = tmp_path / "again"
    for name in ("again_text_document.bin", "again_text_document.idx"):
        (tmp_path / name).write_bytes(b"stale")
    assert _preprocess(run_tool, tiny_corpus, prefix, sp_model) == 0
    assert len(_read(f"{prefix}_text_document")) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again_text_document.bin", "again_text_document.idx", "again_text_document.tokenizer.json"]


def test_progress_lines_report_rates(run_tool, tiny_corpus, tiny_texts, sp_model, tmp_path, capsys) -> None:
    args = ("--input", tiny_corpus, "--output-prefix", tmp_path / "p", "--tokenizer-type", "SentencePieceTokenizer")
    extra = ("--tokenizer-model", sp_model, "--log-interval", "50", "--chunk-bytes", "5000")
    assert run_tool("preprocess_data", *args, *extra) == 0
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err and "MB/s" in err
    assert "Processed " in err and f"Done: {len(tiny_texts)} documents" in err
