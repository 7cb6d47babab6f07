"""Which chapters the memory router selects for probe prompts, and whether a person's probes share them.

The chapters come from the model itself: a forward hook on every memory layer's
:class:`~moc_megatron.memory.router.ChapterRouter` records its top-k selection (``Routing.chapters``,
indices among the routed chapters) while the prompts run through the model, batched by exact length as
in scoring. With ``sequence`` or ``document`` routing a prompt (one document) has one routing unit per memory
layer; with ``chunk`` or ``token`` routing its selection is the union over its units.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from moc_megatron.eval.scoring import _length_batches


def memory_routers(module: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer_number: router}`` of the model's memory layers (empty for a dense model)."""
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

    return {m.layer_number: m.router for m in module.modules() if isinstance(m, MoCMemoryAttention)}


@torch.no_grad()
def prompt_routes(eval_model, texts: Sequence[str], max_batch_tokens: int = 8192) -> dict[int, list[list[int]]]:
    """``{layer_number: [sorted chapter indices selected for text i]}`` for a Megatron MoC model."""
    routers = memory_routers(eval_model.module)
    if not routers:
        raise ValueError("the model has no memory layers: there is no routing to record")
    ids = [eval_model.tokenizer.tokenize(t) for t in texts]
    routes: dict[int, list[list[int]]] = {layer: [[] for _ in texts] for layer in routers}
    captured: dict[int, torch.Tensor] = {}
    handles = [r.register_forward_hook(lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out.chapters))
               for layer, r in routers.items()]
    try:
        for batch in _length_batches([len(x) for x in ids], max_batch_tokens):
            eval_model.logits(torch.tensor([ids[i] for i in batch], dtype=torch.long))
            for layer, chapters in captured.items():
                per_seq = chapters.reshape(len(batch), -1).tolist()  # units are sequence-major
                for row, i in enumerate(batch):
                    routes[layer][i] = sorted(set(per_seq[row]))
            captured.clear()
    finally:
        for h in handles:
            h.remove()
    return routes


def _distinct_per_group(groups: Sequence[Sequence[int]], routes: Sequence[Sequence[int]]) -> float:
    return sum(len({c for i in g for c in routes[i]}) for g in groups) / len(groups)


def person_concentration(persons: Sequence[str], routes: Sequence[Sequence[int]], num_routed: int,
                         seed: int = 0, shuffles: int = 20) -> dict:
    """Do the probes of one person read the same chapters?

    Returns the mean number of distinct chapters a person's probes select together (``distinct``), the
    same for random groups of the same sizes drawn from all probes (``distinct_shuffled``, the baseline
    that keeps the router's overall preferences), the mean share of a person's selections that fall in
    that person's most used chapter (``top_chapter_share``, and shuffled), and chapter usage counts.
    """
    by_person: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(persons):
        by_person[p].append(i)
    groups = list(by_person.values())

    def top_share(gs):
        shares = []
        for g in gs:
            counts = Counter(c for i in g for c in routes[i])
            shares.append(max(counts.values()) / len(g) if counts else 0.0)
        return sum(shares) / len(shares)

    rng = random.Random(seed)
    order = list(range(len(persons)))
    distinct_s, share_s = [], []
    for _ in range(shuffles):
        rng.shuffle(order)
        it = iter(order)
        shuffled = [[next(it) for _ in g] for g in groups]
        distinct_s.append(_distinct_per_group(shuffled, routes))
        share_s.append(top_share(shuffled))
    usage = Counter(c for r in routes for c in r)
    return dict(
        people=len(groups),
        probes_per_person=sum(len(g) for g in groups) / len(groups),
        selected_per_probe=sum(len(r) for r in routes) / max(len(routes), 1),
        distinct=_distinct_per_group(groups, routes),
        distinct_shuffled=sum(distinct_s) / shuffles,
        top_chapter_share=top_share(groups),
        top_chapter_share_shuffled=sum(share_s) / shuffles,
        chapters_used=len(usage),
        num_routed_chapters=num_routed,
        usage=[usage.get(c, 0) for c in range(num_routed)],
    )


def document_probe_overlap(persons: Sequence[str], probe_routes: Sequence[Sequence[int]],
                           document_persons: Sequence[str], document_routes: Sequence[Sequence[int]]) -> dict:
    """Do a person's probes read the chapters that person's documents (biographies) selected in training?

    ``overlap``: the mean share of a probe's chapters that the documents of its own person selected;
    ``overlap_other``: the same against the documents of every other person, averaged (the baseline that keeps
    the router's overall preferences); ``document_chapters``: distinct chapters a person's documents select.
    """
    chapters_of: dict[str, set[int]] = defaultdict(set)
    for person, route in zip(document_persons, document_routes):
        chapters_of[person].update(route)
    own, other = [], []
    people = list(chapters_of)
    for person, route in zip(persons, probe_routes):
        if person not in chapters_of or not route:
            continue
        own.append(len(set(route) & chapters_of[person]) / len(route))
        others = [len(set(route) & chapters_of[p]) / len(route) for p in people if p != person]
        if others:
            other.append(sum(others) / len(others))
    return dict(
        probes=len(own),
        overlap=sum(own) / len(own) if own else 0.0,
        overlap_other=sum(other) / len(other) if other else 0.0,
        document_chapters=sum(len(c) for c in chapters_of.values()) / max(len(chapters_of), 1),
    )


@torch.no_grad()
def memory_contribution(eval_model, texts: Sequence[str], max_batch_tokens: int = 8192) -> dict[int, float]:
    """``{layer_number: mean over tokens of |memory read output| / |residual stream entering the layer|}`` on
    ``texts``, for a Megatron MoC model: how much each memory layer writes into the residual stream."""
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

    layers = {}
    for module in eval_model.module.modules():
        cross = getattr(module, "cross_attention", None)
        if isinstance(cross, MoCMemoryAttention):
            layers[cross.layer_number] = (module, cross)
    if not layers:
        raise ValueError("the model has no memory layers: there is no memory contribution to measure")
    sums = dict.fromkeys(layers, 0.0)
    count = 0
    residual: dict[int, torch.Tensor] = {}
    ratios: dict[int, torch.Tensor] = {}

    def entering(number):
        def hook(_module, args, kwargs):
            residual[number] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def written(number):
        def hook(_module, _args, out):
            ratios[number] = out[0].norm(dim=-1) / residual[number].norm(dim=-1).clamp(min=1e-12)
        return hook

    handles = []
    for number, (layer, cross) in layers.items():
        handles.append(layer.register_forward_pre_hook(entering(number), with_kwargs=True))
        handles.append(cross.register_forward_hook(written(number)))
    ids = [eval_model.tokenizer.tokenize(t) for t in texts]
    try:
        for batch in _length_batches([len(x) for x in ids], max_batch_tokens):
            eval_model.logits(torch.tensor([ids[i] for i in batch], dtype=torch.long))
            for number, ratio in ratios.items():
                sums[number] += float(ratio.sum())
            count += sum(len(ids[i]) for i in batch)
            ratios.clear()
    finally:
        for h in handles:
            h.remove()
    return {number: total / max(count, 1) for number, total in sums.items()}
