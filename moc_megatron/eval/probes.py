"""Fact probes: reading a probes jsonl file and building the multiple-choice candidate sets.

A probe line (as written by ``tools/make_synthetic_corpus.py``) holds at least ``prompt`` (text the model
continues), ``completion`` (the true continuation, with its leading space) and ``attribute`` (which fact
it asks about); ``id`` and ``person`` are optional. The candidates of a probe are every distinct
completion its attribute takes in a candidates file (by default the probes file itself, which lists every
person of the corpus), optionally capped to ``max_candidates`` by a seeded draw that always keeps the true
value.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from moc_megatron.errors import MoCError

REQUIRED_KEYS = ("prompt", "completion", "attribute")


class ProbeFileError(MoCError, ValueError):
    """A probes file line is malformed (the message names the file and line)."""


@dataclass(frozen=True)
class Probe:
    """One held-out question about one fact."""

    id: str
    prompt: str
    completion: str
    attribute: str
    person: str = ""


def load_probes(path: str, limit: int | None = None) -> list[Probe]:
    """The probes of a jsonl file (first ``limit`` if given); a bad line raises :class:`ProbeFileError`."""
    probes: list[Probe] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProbeFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ProbeFileError(f"{path}:{number}: expected a JSON object")
            missing = [k for k in REQUIRED_KEYS if not isinstance(record.get(k), str) or not record.get(k)]
            if missing:
                raise ProbeFileError(f"{path}:{number}: missing or non-string key(s) {', '.join(missing)}")
            probes.append(Probe(id=str(record.get("id", f"line{number}")), prompt=record["prompt"],
                                completion=record["completion"], attribute=record["attribute"],
                                person=str(record.get("person", ""))))
            if limit is not None and len(probes) >= limit:
                break
    if not probes:
        raise ProbeFileError(f"{path}: no probes")
    return probes


def attribute_values(probes: Sequence[Probe]) -> dict[str, list[str]]:
    """Every distinct completion per attribute, sorted (a fixed order, independent of the file's)."""
    values: dict[str, set[str]] = {}
    for probe in probes:
        values.setdefault(probe.attribute, set()).add(probe.completion)
    return {attr: sorted(v) for attr, v in values.items()}


def candidate_sets(probes: Sequence[Probe], values: dict[str, list[str]], max_candidates: int | None = None,
                   seed: int = 0) -> list[list[str]]:
    """The candidates of each probe: the true completion first, then the other values of its attribute.

    With ``max_candidates`` the distractors are a draw of ``max_candidates - 1`` values seeded by the
    probe id and ``seed`` (the same probe always gets the same distractors).
    """
    out = []
    for probe in probes:
        pool = values.get(probe.attribute)
        if pool is None or probe.completion not in pool:
            raise ProbeFileError(f"probe {probe.id}: its completion {probe.completion!r} is not among the "
                                 f"candidate values of attribute {probe.attribute!r}")
        others = [v for v in pool if v != probe.completion]
        if max_candidates is not None and len(others) > max_candidates - 1:
            rng = random.Random(zlib.crc32(f"{seed}:{probe.id}".encode()))
            others = rng.sample(others, max_candidates - 1)
        out.append([probe.completion, *others])
    return out
