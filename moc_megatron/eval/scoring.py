"""Scoring a language model on fact probes: greedy exact match, multiple-choice rank, validation loss.

Everything here talks to the model through one small interface, :data:`LogitsFn`: token ids ``[b, s]``
(int64) in, next-token logits ``[b, s, V]`` out. The Megatron and the Hugging Face backends
(:mod:`moc_megatron.eval.models`) both provide one.

Sequences are never padded: they are batched by exact length. Under the paper's ``sequence`` routing the
memory router pools over every position of a sequence, so a pad token would change the chapters a
sequence reads; batching by length makes a batched score equal to scoring each sequence alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""``tokens [b, s] int64 -> logits [b, s, V]``: logits at position ``t`` predict token ``t + 1``."""


class TextTokenizer(Protocol):
    """The two tokenizer methods scoring needs (``MoCTokenizer`` has them)."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...


def split_continuation(tokenizer: TextTokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``completion`` as they appear in ``prompt + completion``.

    The whole text is tokenized at once (as the training data was); if its tokens do not start with the
    prompt's own tokens (a token straddles the boundary), the completion is tokenized on its own.
    """
    prompt_ids = list(tokenizer.tokenize(prompt))
    full = list(tokenizer.tokenize(prompt + completion))
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids):]
    cont = list(tokenizer.tokenize(completion))
    if not cont:
        raise ValueError(f"completion {completion!r} tokenizes to nothing")
    return prompt_ids, cont


def _length_batches(lengths: Sequence[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped by equal length, each group cut into batches of at most ``max_batch_tokens`` tokens."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    for n in sorted(groups):
        per_batch = max(1, max_batch_tokens // max(n, 1))
        members = groups[n]
        for start in range(0, len(members), per_batch):
            yield members[start:start + per_batch]


@torch.no_grad()
def continuation_logprobs(model: LogitsFn, pairs: Sequence[tuple[list[int], list[int]]],
                          max_batch_tokens: int = 8192) -> list[float]:
    """``sum log p(continuation | prompt)`` for each ``(prompt_ids, continuation_ids)`` pair."""
    seqs = [p + c for p, c in pairs]
    scores = [0.0] * len(pairs)
    for batch in _length_batches([len(s) for s in seqs], max_batch_tokens):
        tokens = torch.tensor([seqs[i] for i in batch], dtype=torch.long)
        logprobs = torch.log_softmax(model(tokens[:, :-1]).float(), dim=-1)
        picked = logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # [b, s-1]: log p(token t+1)
        for row, i in enumerate(batch):
            start = len(pairs[i][0]) - 1
            scores[i] = picked[row, start:].sum().item()
    return scores


@torch.no_grad()
def greedy_continuations(model: LogitsFn, prompts: Sequence[list[int]], num_tokens: Sequence[int],
                         max_batch_tokens: int = 8192) -> list[list[int]]:
    """Greedy (argmax) generation of ``num_tokens[i]`` tokens after ``prompts[i]``, with no cache.

    Each step runs the whole prefix, so every routing unit (``sequence`` included) routes exactly as it
    would for that prefix alone.
    """
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max(num_tokens, default=0)):
        active = [i for i in range(len(seqs)) if len(out[i]) < num_tokens[i]]
        lengths = [len(seqs[i]) for i in active]
        for batch in _length_batches(lengths, max_batch_tokens):
            ids = [active[j] for j in batch]
            tokens = torch.tensor([seqs[i] for i in ids], dtype=torch.long)
            nxt = model(tokens)[:, -1].argmax(dim=-1).tolist()
            for i, t in zip(ids, nxt):
                seqs[i].append(t)
                out[i].append(t)
    return out


def rank_of_true(scores: Sequence[float], true_index: int = 0) -> int:
    """1 + the number of other candidates scoring at least as high (ties count against the true value)."""
    true = scores[true_index]
    return 1 + sum(1 for j, s in enumerate(scores) if j != true_index and s >= true)


def exact_match(generated: str, completion: str) -> bool:
    """The generated text begins with the completion, ignoring surrounding whitespace, and ends there."""
    gen, answer = generated.strip(), completion.strip()
    return gen.startswith(answer) and (len(gen) == len(answer) or not gen[len(answer)].isalnum())


@dataclass
class ProbeOutcome:
    """How the model did on one probe."""

    id: str
    attribute: str
    person: str
    completion: str
    generated: str
    exact: bool
    rank: int
    num_candidates: int
    predicted: str
    """The candidate with the highest log-likelihood."""


@dataclass
class RecallSummary:
    """Recall over a group of probes."""

    probes: int
    exact_match: float
    """Fraction of probes whose greedy continuation is the completion."""
    mc_accuracy: float
    """Fraction whose true value ranks first among the candidates (log-likelihood)."""
    mean_reciprocal_rank: float
    mean_rank: float
    chance_mc_accuracy: float
    """Expected ``mc_accuracy`` of a model that ranks at random (mean of 1 / candidates)."""


@dataclass
class ProbeReport:
    """Per-attribute and overall recall, and the per-probe outcomes."""

    overall: RecallSummary
    by_attribute: dict[str, RecallSummary]
    outcomes: list[ProbeOutcome] = field(default_factory=list)
    validation_loss: float | None = None
    validation_tokens: int | None = None

    def to_dict(self, with_outcomes: bool = False) -> dict:
        """JSON-ready form (per-probe outcomes only if asked)."""
        out = {"overall": asdict(self.overall),
               "by_attribute": {k: asdict(v) for k, v in self.by_attribute.items()},
               "validation_loss": self.validation_loss, "validation_tokens": self.validation_tokens}
        if with_outcomes:
            out["outcomes"] = [asdict(o) for o in self.outcomes]
        return out


def summarize(outcomes: Sequence[ProbeOutcome]) -> RecallSummary:
    """Recall statistics of ``outcomes``."""
    n = len(outcomes)
    return RecallSummary(
        probes=n,
        exact_match=sum(o.exact for o in outcomes) / n,
        mc_accuracy=sum(o.rank == 1 for o in outcomes) / n,
        mean_reciprocal_rank=sum(1.0 / o.rank for o in outcomes) / n,
        mean_rank=sum(o.rank for o in outcomes) / n,
        chance_mc_accuracy=sum(1.0 / o.num_candidates for o in outcomes) / n,
    )


def score_probes(model: LogitsFn, tokenizer: TextTokenizer, probes: Sequence, candidates: Sequence[Sequence[str]],
                 max_batch_tokens: int = 8192) -> ProbeReport:
    """Greedy exact match and multiple-choice rank of every probe.

    ``candidates[i]`` lists probe ``i``'s candidate completions with the true one first (see
    :func:`moc_megatron.eval.probes.candidate_sets`); the rank does not depend on their order.
    """
    splits = [split_continuation(tokenizer, p.prompt, p.completion) for p in probes]
    generated = greedy_continuations(model, [s[0] for s in splits], [len(s[1]) for s in splits], max_batch_tokens)
    pairs, owner = [], []
    for i, probe in enumerate(probes):
        if not candidates[i] or candidates[i][0] != probe.completion:
            raise ValueError(f"probe {probe.id}: candidates must start with its completion")
        for cand in candidates[i]:
            pairs.append(split_continuation(tokenizer, probe.prompt, cand))
            owner.append(i)
    flat = continuation_logprobs(model, pairs, max_batch_tokens)
    per_probe: list[list[float]] = [[] for _ in probes]
    for i, s in zip(owner, flat):
        per_probe[i].append(s)
    outcomes = []
    for i, probe in enumerate(probes):
        text = tokenizer.detokenize(generated[i])
        scores = per_probe[i]
        best = max(range(len(scores)), key=lambda j: (scores[j], j != 0))  # ties: not the true value
        outcomes.append(ProbeOutcome(
            id=probe.id, attribute=probe.attribute, person=probe.person, completion=probe.completion,
            generated=text, exact=exact_match(text, probe.completion), rank=rank_of_true(scores, 0),
            num_candidates=len(scores), predicted=candidates[i][best]))
    by_attr: dict[str, list[ProbeOutcome]] = defaultdict(list)
    for o in outcomes:
        by_attr[o.attribute].append(o)
    return ProbeReport(overall=summarize(outcomes), by_attribute={a: summarize(v) for a, v in sorted(by_attr.items())},
                       outcomes=outcomes)


@torch.no_grad()
def validation_loss(model: LogitsFn, documents: Iterable[Sequence[int]], seq_length: int,
                    max_sequences: int = 64, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy over ``documents`` concatenated and cut into ``seq_length + 1`` windows.

    Returns ``(loss, tokens scored)``; stops after ``max_sequences`` windows (as Megatron's GPT dataset:
    documents run on across window boundaries, a window of ``seq_length + 1`` tokens gives
    ``seq_length`` predictions).
    """
    windows, buf = [], []
    for doc in documents:
        buf.extend(int(t) for t in doc)
        while len(buf) >= seq_length + 1 and len(windows) < max_sequences:
            windows.append(buf[: seq_length + 1])
            buf = buf[seq_length:]
        if len(windows) >= max_sequences:
            break
    if not windows:
        raise ValueError(f"validation data holds fewer than {seq_length + 1} tokens")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        tokens = torch.tensor(windows[start:start + batch_size], dtype=torch.long)
        logits = model(tokens[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += tokens[:, 1:].numel()
    return total / count, count


def format_report(report: ProbeReport, title: str = "") -> str:
    """A fixed-width table: one row per attribute and one for all probes."""
    head = f"{'attribute':<18}{'probes':>7}{'exact':>8}{'mc acc':>8}{'MRR':>7}{'mean rank':>10}{'chance':>8}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def row(name: str, s: RecallSummary) -> str:
        return (f"{name:<18}{s.probes:>7}{100 * s.exact_match:>7.1f}%{100 * s.mc_accuracy:>7.1f}%"
                f"{s.mean_reciprocal_rank:>7.3f}{s.mean_rank:>10.2f}{100 * s.chance_mc_accuracy:>7.1f}%")

    lines += [row(a, s) for a, s in report.by_attribute.items()]
    lines += ["-" * len(head), row("all", report.overall)]
    if report.validation_loss is not None:
        lines.append(f"validation loss {report.validation_loss:.4f} over {report.validation_tokens} tokens "
                     f"(perplexity {math.exp(min(report.validation_loss, 50)):.2f})")
    return "\n".join(lines)
