"""The corpora that need no download: synthetic biographies (+ probes, chats) and CPython's documentation."""

from __future__ import annotations

import json

import pytest

from moc_megatron.data.chat import validate_messages
from moc_megatron.data.jsonl import write_jsonl
from moc_megatron.data.synthetic_corpus import (
    ATTRIBUTES,
    corpus_documents,
    generate_people,
    probes,
    synthetic_chats,
)
from moc_megatron.data.text_corpus import LICENSE_NAME, text_corpus_documents


def test_people_are_deterministic_and_unique() -> None:
    assert generate_people(300, seed=1) == generate_people(300, seed=1)
    assert generate_people(300, seed=1) != generate_people(300, seed=2)
    people = generate_people(6000, seed=0)  # more than first x last names: middle initials kick in
    assert len({p.name for p in people}) == 6000


def test_every_biography_states_every_attribute() -> None:
    people = generate_people(50, seed=4)
    docs = list(corpus_documents(people, bios_per_person=3, seed=4))
    assert len(docs) == 150 and len({d["text"] for d in docs}) == 150
    by_person = {}
    for doc in docs:
        by_person.setdefault(int(doc["id"][6:12]), []).append(doc["text"])
    for index, person in enumerate(people):
        for text in by_person[index]:
            assert person.name in text
            for attribute in ATTRIBUTES:
                value = person.value(attribute).removeprefix("the ")
                if attribute == "birth_date":
                    assert str(person.birth_year) in text and person.birth_month in text
                else:
                    assert value in text, (attribute, text)


def test_probes_are_held_out_and_answerable() -> None:
    people = generate_people(40, seed=5)
    corpus = " ".join(d["text"] for d in corpus_documents(people, bios_per_person=4, seed=5))
    rows = list(probes(people))
    assert len(rows) == 40 * len(ATTRIBUTES)
    for row in rows:
        assert row["question"] not in corpus and row["prompt"] not in corpus
        assert row["completion"] == " " + row["answer"]


def test_synthetic_chats_are_valid_conversations() -> None:
    chats = list(synthetic_chats(generate_people(10, seed=6), 30, seed=6))
    assert chats == list(synthetic_chats(generate_people(10, seed=6), 30, seed=6))
    for chat in chats:
        messages = validate_messages(chat["messages"])
        roles = [m["role"] for m in messages if m["role"] != "system"]
        assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)


def test_make_synthetic_corpus_tool(run_tool, tmp_path) -> None:
    out = tmp_path / "bios.jsonl.gz"
    args = ("--output", out, "--num-people", "20", "--chat-output", tmp_path / "chat.jsonl", "--num-chats", "5")
    assert run_tool("make_synthetic_corpus", *args) == 0
    first = out.read_bytes()
    assert run_tool("make_synthetic_corpus", *args) == 0
    assert out.read_bytes() == first  # byte-identical, gzip header included
    import gzip

    assert len(gzip.decompress(first).splitlines()) == 20
    assert len((tmp_path / "bios_probes.jsonl.gz").read_bytes()) > 0
    assert len((tmp_path / "chat.jsonl").read_text().splitlines()) == 5


def test_text_corpus_from_cpython_docstrings(run_tool, tmp_path) -> None:
    docs = list(text_corpus_documents(modules=["json", "textwrap"], include_topics=False))
    ids = [d["id"] for d in docs]
    assert "stdlib/json" in ids and "stdlib/textwrap" in ids
    assert all(d["license"] == LICENSE_NAME for d in docs)
    json_doc = next(d["text"] for d in docs if d["id"] == "stdlib/json")
    assert "JSON (JavaScript Object Notation)" in json_doc and "dumps(obj" in json_doc
    out = tmp_path / "text.jsonl"
    assert run_tool("make_text_corpus", "--output", out, "--modules", "textwrap") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and any(r["id"].startswith("topics/") for r in rows)
    assert "PSF" in (tmp_path / "text.jsonl.LICENSE.txt").read_text()


def test_make_text_corpus_help_states_the_license(run_tool, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_tool("make_text_corpus", "--help")
    assert exit_info.value.code == 0
    assert "PSF License Agreement" in capsys.readouterr().out


def test_write_jsonl_is_atomic(tmp_path) -> None:
    def records():
        yield {"text": "one"}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(str(tmp_path / "x.jsonl"), records())
    assert list(tmp_path.iterdir()) == []
    assert write_jsonl(str(tmp_path / "x.jsonl"), [{"text": "é"}]) == 1
    assert (tmp_path / "x.jsonl").read_text(encoding="utf-8") == '{"text": "é"}\n'
