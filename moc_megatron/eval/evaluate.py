"""One evaluation: probes (+ candidates) and optional held-out data in, a :class:`ProbeReport` out."""

from __future__ import annotations

from dataclasses import dataclass

from moc_megatron.eval.probes import attribute_values, candidate_sets, load_probes
from moc_megatron.eval.scoring import ProbeReport, score_probes, validation_loss


@dataclass
class EvalSettings:
    """What to evaluate and how."""

    probes: str
    """Probes jsonl (``prompt``, ``completion``, ``attribute``)."""
    candidates: str | None = None
    """Probes jsonl whose completions give each attribute's values (default: ``probes``)."""
    max_candidates: int | None = None
    """Cap on candidates per probe (the true value plus a seeded draw of distractors); None: all values."""
    limit: int | None = None
    """Evaluate only the first ``limit`` probes."""
    valid_data: str | None = None
    """Megatron indexed dataset prefix (``.bin``/``.idx``) of held-out text for the validation loss."""
    valid_seq_length: int = 256
    valid_max_sequences: int = 64
    max_batch_tokens: int = 8192
    seed: int = 0


def indexed_documents(prefix: str):
    """The documents of a Megatron indexed dataset, as numpy token arrays."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    for i in range(len(dataset)):
        yield dataset[i]


def evaluate_model(model, settings: EvalSettings) -> ProbeReport:
    """Recall of ``model`` (an :class:`~moc_megatron.eval.models.EvalModel`) on the probes, and its
    validation loss when ``settings.valid_data`` is given."""
    probes = load_probes(settings.probes, settings.limit)
    pool = load_probes(settings.candidates) if settings.candidates else load_probes(settings.probes)
    candidates = candidate_sets(probes, attribute_values(pool), settings.max_candidates, settings.seed)
    report = score_probes(model, model.tokenizer, probes, candidates, settings.max_batch_tokens)
    if settings.valid_data:
        report.validation_loss, report.validation_tokens = validation_loss(
            model, indexed_documents(settings.valid_data), settings.valid_seq_length, settings.valid_max_sequences)
    return report
