"""Fact-recall evaluation: a model that memorised its facts scores ~100%, an untrained one ~chance;
the multiple-choice rank ignores candidate order; dense and MoC checkpoints load as they were saved."""

from __future__ import annotations

import importlib.util
import json
import random
import warnings

import pytest
import torch

from moc_megatron.eval.models import EvalModel, load_megatron
from moc_megatron.eval.probes import Probe, ProbeFileError, attribute_values, candidate_sets, load_probes
from moc_megatron.eval.routing import (
    document_probe_overlap,
    memory_contribution,
    person_concentration,
    prompt_routes,
)
from moc_megatron.eval.scoring import (
    continuation_logprobs,
    greedy_continuations,
    rank_of_true,
    score_probes,
    split_continuation,
)
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.loop import pretrain

COLOURS = "red blue green amber teal ochre violet coral".split()
CITIES = "Lisbon Porto Leiden Bremen Graz Riga Turku Cork".split()
PETS = "cat dog owl fox hare newt crow mole".split()
NAMES = "Ada Basil Calla Dagny Edda Florin Greta Idris Juno Kaspar Liesel Magnus".split()
# Equally long prompts: the memorisation run trains on one batch of equal-length sequences.
TEMPLATES = {"colour": "the colour of {n} is", "city": "the city of {n} is", "pet": "the pet of {n} is"}


class WordTokenizer:
    """Whitespace word-level tokenizer: every candidate value is exactly one token (no length bias)."""

    def __init__(self, words):
        self.words = sorted(set(words))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    def tokenize(self, text):
        return [self.index[w] for w in text.split()]

    def detokenize(self, ids):
        return " ".join(self.words[i] for i in ids)


def make_probes(seed: int = 0) -> list[Probe]:
    rng = random.Random(seed)
    probes = []
    for name in NAMES:
        for attr, pool in (("colour", COLOURS), ("city", CITIES), ("pet", PETS)):
            probes.append(Probe(id=f"{name}-{attr}", prompt=TEMPLATES[attr].format(n=name),
                                completion=" " + rng.choice(pool), attribute=attr, person=name))
    return probes


def model_args(*extra: str) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
            "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", "16",
            "--max-position-embeddings", "16", "--vocab-size", "128", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--num-workers", "0", *extra]


MOC_FLAGS = ("--moc-memory-layers", "1", "--moc-num-chapters", "9", "--moc-chapter-size", "4", "--moc-top-k", "2")


def build_in_memory(tokenizer: WordTokenizer, seed: int) -> EvalModel:
    from moc_megatron.model.builder import build_model
    from moc_megatron.platform import model_parallel_manual_seed
    from moc_megatron.training.config_from_args import run_model_settings

    run = parse_run_config(model_args("--mock-data", *MOC_FLAGS), world_size=1, exit_on_error=False)
    model_parallel_manual_seed(seed)
    module = build_model(run.model, run_model_settings(run), use_te=False)
    return EvalModel(module.eval(), tokenizer, "megatron", tokenizer.vocab_size)


def memorise(model: EvalModel, probes: list[Probe], steps: int = 120) -> float:
    """Train on the probe sentences themselves (plain AdamW, no aux losses) until they are memorised."""
    seqs = [model.tokenizer.tokenize(p.prompt + p.completion) for p in probes]
    opt = torch.optim.AdamW(model.module.parameters(), lr=3e-3, weight_decay=0.0)
    model.module.train()
    loss = None
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for n in sorted({len(s) for s in seqs}):
            tokens = torch.tensor([s for s in seqs if len(s) == n])
            logits = model.module(tokens[:, :-1], torch.arange(n - 1).expand(len(tokens), -1), None)
            logits = logits[..., : model.vocab_size]
            loss = torch.nn.functional.cross_entropy(logits[:, -1], tokens[:, -1])  # the value token
            (loss * len(tokens) / len(seqs)).backward()
            total += loss.item() * len(tokens) / len(seqs)
        opt.step()
    model.module.eval()
    return total


@pytest.fixture(scope="module")
def setup(mcore_world):
    probes = make_probes()
    words = [w for p in probes for w in (p.prompt + p.completion).split()] + COLOURS + CITIES + PETS
    tokenizer = WordTokenizer(words)
    values = {"colour": [" " + c for c in COLOURS], "city": [" " + c for c in CITIES], "pet": [" " + c for c in PETS]}
    candidates = candidate_sets(probes, values)
    return probes, tokenizer, candidates


def test_memorised_model_recalls_nearly_everything(setup):
    probes, tokenizer, candidates = setup
    model = build_in_memory(tokenizer, seed=3)
    final_loss = memorise(model, probes)
    report = score_probes(model, tokenizer, probes, candidates)
    assert final_loss < 0.05, final_loss
    assert report.overall.mc_accuracy >= 0.95, report.overall
    assert report.overall.exact_match >= 0.95, report.overall
    assert report.overall.mean_reciprocal_rank >= 0.97
    for summary in report.by_attribute.values():
        assert summary.mc_accuracy >= 0.9


def test_untrained_model_is_near_chance(setup):
    probes, tokenizer, candidates = setup
    accuracies = []
    for seed in (11, 12, 13):
        report = score_probes(build_in_memory(tokenizer, seed=seed), tokenizer, probes, candidates)
        assert report.overall.chance_mc_accuracy == pytest.approx(1 / 8)
        accuracies.append(report.overall.mc_accuracy)
        assert report.overall.exact_match <= 0.3
    # 36 probes x 3 seeds at chance 1/8: the mean is ~0.125 (sd ~0.03); a memorised model gets ~1.
    assert sum(accuracies) / 3 < 0.3, accuracies


def test_ranking_is_invariant_to_candidate_order(setup):
    probes, tokenizer, candidates = setup
    model = build_in_memory(tokenizer, seed=5)
    rng = random.Random(0)
    for probe, cands in list(zip(probes, candidates))[:6]:
        order = list(range(len(cands)))
        rng.shuffle(order)
        shuffled = [cands[j] for j in order]
        pairs = [split_continuation(tokenizer, probe.prompt, c) for c in cands]
        pairs_s = [split_continuation(tokenizer, probe.prompt, c) for c in shuffled]
        scores, scores_s = continuation_logprobs(model, pairs), continuation_logprobs(model, pairs_s)
        assert [scores[j] for j in order] == pytest.approx(scores_s, abs=1e-5)
        assert rank_of_true(scores, 0) == rank_of_true(scores_s, order.index(0))
    # The probe file's order and the values' order do not change the candidate sets or any outcome.
    values = {"colour": [" " + c for c in COLOURS], "city": [" " + c for c in CITIES], "pet": [" " + c for c in PETS]}
    reversed_values = {k: v[::-1] for k, v in values.items()}
    capped = candidate_sets(probes, attribute_values(probes), max_candidates=4, seed=1)
    capped_rev = candidate_sets(probes[::-1], attribute_values(probes[::-1]), max_candidates=4, seed=1)[::-1]
    assert capped == capped_rev
    a = score_probes(model, tokenizer, probes, candidate_sets(probes, values))
    b = score_probes(model, tokenizer, probes, candidate_sets(probes, reversed_values))
    assert [o.rank for o in a.outcomes] == [o.rank for o in b.outcomes]


def test_ties_count_against_the_true_value():
    assert rank_of_true([1.0, 1.0, 0.5], 0) == 2
    assert rank_of_true([2.0, 1.0, 0.5], 0) == 1
    assert rank_of_true([0.5, 1.0, 2.0], 0) == 3


def test_batched_scores_equal_one_at_a_time(setup):
    """Sequence routing pools over the whole sequence: batching (by exact length) must not change a score."""
    probes, tokenizer, candidates = setup
    model = build_in_memory(tokenizer, seed=6)
    pairs = [split_continuation(tokenizer, p.prompt, c) for p, cs in zip(probes[:8], candidates) for c in cs[:3]]
    batched = continuation_logprobs(model, pairs)
    single = [continuation_logprobs(model, [pair])[0] for pair in pairs]
    assert batched == pytest.approx(single, abs=1e-5)
    prompts = [p[0] for p in pairs[:6]]
    gen = greedy_continuations(model, prompts, [3] * 6)
    assert gen == [greedy_continuations(model, [p], [3])[0] for p in prompts]


def test_routing_records_the_selected_chapters(setup):
    probes, tokenizer, _ = setup
    model = build_in_memory(tokenizer, seed=7)
    routes = prompt_routes(model, [p.prompt for p in probes])
    assert list(routes) == [2]  # memory layer 1 (0-based) is layer_number 2
    for chapters in routes[2]:
        assert len(chapters) == 2 and all(0 <= c < 8 for c in chapters)
    stats = person_concentration([p.person for p in probes], routes[2], num_routed=8)
    assert stats["people"] == len(NAMES) and stats["selected_per_probe"] == 2
    assert 2 <= stats["distinct"] <= 6 and sum(stats["usage"]) == 2 * len(probes)


def test_document_probe_overlap_compares_own_documents_with_other_peoples():
    persons = ["ann", "ann", "bob"]
    probe_routes = [[1, 2], [1, 3], [5, 6]]
    stats = document_probe_overlap(persons, probe_routes, ["ann", "bob", "bob"], [[1, 2, 3], [5], [7]])
    # ann's probes: 2/2 and 2/2 of their chapters in ann's documents, 0 in bob's; bob's: 1/2 own, 0 in ann's.
    assert stats["probes"] == 3 and stats["overlap"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert stats["overlap_other"] == 0.0 and stats["document_chapters"] == 2.5


def test_memory_contribution_is_zero_for_a_new_memory_and_grows_with_its_output(setup):
    probes, tokenizer, _ = setup
    model = build_in_memory(tokenizer, seed=7)
    prompts = [p.prompt for p in probes[:6]]
    with torch.no_grad():
        for m in model.module.modules():
            if hasattr(m, "linear_o") and hasattr(m, "router"):
                m.linear_o.weight.zero_()  # W_O starts at zero: the memory writes nothing
    assert memory_contribution(model, prompts) == {2: 0.0}
    with torch.no_grad():
        for m in model.module.modules():
            if hasattr(m, "linear_o") and hasattr(m, "router"):
                m.linear_o.weight.normal_(0, 0.5)
    ratio = memory_contribution(model, prompts)[2]
    assert 0.05 < ratio < 50


def test_probe_file_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "completion": " b", "attribute": "x"}\n{"prompt": "a", "attribute": "x"}\n')
    with pytest.raises(ProbeFileError, match=r"p.jsonl:2: .*completion"):
        load_probes(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ProbeFileError, match=r"p.jsonl:1: not valid JSON"):
        load_probes(str(path))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mcore_world):
    root = tmp_path_factory.mktemp("eval_ckpt")
    pretrain(parse_run_config(model_args("--mock-data", "--vocab-size", "512", "--save", str(root / "dense")),
                        world_size=1, exit_on_error=False))
    pretrain(parse_run_config(model_args("--mock-data", "--vocab-size", "512", "--save", str(root / "moc"), *MOC_FLAGS),
                        world_size=1, exit_on_error=False))
    return root


@pytest.mark.parametrize("kind", ["dense", "moc"])
def test_dense_and_moc_checkpoints_load(checkpoints, sp_model, kind):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from moc_megatron.eval.routing import memory_routers

    model = load_megatron(str(checkpoints / kind), tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model)
    assert model.info["iteration"] == 2
    assert bool(memory_routers(model.module)) == (kind == "moc")
    saved = dist_checkpointing.load_plain_tensors(model.info["checkpoint"])
    compared = 0
    for sharded in model.module.sharded_state_dict().values():
        if isinstance(sharded, ShardedTensor) and sharded.key in saved and "_extra_state" not in sharded.key:
            axes = sharded.prepend_axis_num
            lead, rest = sharded.global_offset[:axes], sharded.global_offset[axes:]
            region = tuple(slice(o, o + 1) for o in lead) + tuple(
                slice(o, o + n) for o, n in zip(rest, sharded.data.shape))
            stored = saved[sharded.key][region].reshape(sharded.data.shape)
            assert torch.equal(sharded.data.float(), stored.float()), sharded.key
            compared += 1
    assert compared >= 10
    logits = model.logits(torch.randint(0, 512, (2, 7)))
    assert logits.shape == (2, 7, 512) and torch.isfinite(logits).all()


def test_tool_writes_json_and_rejects_bad_input(checkpoints, sp_model, run_tool, tmp_path, capsys):
    from moc_megatron.data.jsonl import write_jsonl
    from moc_megatron.data.synthetic_corpus import generate_people, probes

    probe_file = tmp_path / "probes.jsonl"
    write_jsonl(str(probe_file), probes(generate_people(3, seed=1)))
    out = tmp_path / "out.json"
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    rc = run_tool("evaluate_probes", "--load", checkpoints / "moc", "--probes", probe_file, "--json", out,
                  "--max-candidates", "3", "--outcomes", *common)
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["overall"]["probes"] == 24 and set(result["by_attribute"]) == {
        "birth_date", "birth_city", "university", "major", "profession", "employer", "favourite_colour", "hobby"}
    assert max(o["num_candidates"] for o in result["outcomes"]) == 3  # capped (3 people may share a value)
    assert "mc acc" in capsys.readouterr().out
    assert run_tool("evaluate_probes", "--load", tmp_path, "--probes", probe_file, *common) == 2
    assert "no latest_checkpointed_iteration.txt" in capsys.readouterr().err
    assert run_tool("evaluate_probes", "--load", checkpoints / "moc", "--probes", probe_file,
                    "--max-candidates", "1", *common) == 2


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not (_have("transformers") and _have("moc_megatron.hf.export")),
                    reason="needs transformers and the Hugging Face export (moc_megatron.hf.export)")
def test_hf_backend_matches_megatron(checkpoints, sp_model, tmp_path, capfd):
    """--hf (transformers' AutoModelForCausalLM on an exported folder) scores as --load does; neither load
    prints a progress bar or warns (torch's notice about megatron-core 0.16.1's deprecated load call included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.utils import logging as hf_logging

    from moc_megatron.eval.models import load_hf
    from moc_megatron.hf import export

    folder = tmp_path / "tok"  # a 512-entry placeholder HF tokenizer for the export; scoring uses sp_model
    folder.mkdir()
    vocab = {f"w{i}": i for i in range(511)} | {"<|endoftext|>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    out = tmp_path / "hf"
    export.export_checkpoint(export.ExportOptions(load=str(checkpoints / "moc"), output=str(out),
                                                  tokenizer_model=str(folder), tokenizer_type="HuggingFaceTokenizer"),
                             log=lambda *a, **k: None)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = load_hf(str(out), "SentencePieceTokenizer", sp_model)
        mg = load_megatron(str(checkpoints / "moc"), tokenizer_type="SentencePieceTokenizer",
                           tokenizer_model=sp_model)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))] == []
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched off for the load only
    tokens = torch.randint(0, 512, (3, 9))
    torch.testing.assert_close(hf.logits(tokens), mg.logits(tokens), rtol=1e-4, atol=1e-4)
    probes = [Probe(id=str(i), prompt=f"The colour of person {i} is", completion=c, attribute="colour")
              for i, c in enumerate([" red", " blue", " green"])]
    cands = candidate_sets(probes, attribute_values(probes))
    a, b = score_probes(hf, hf.tokenizer, probes, cands), score_probes(mg, mg.tokenizer, probes, cands)
    assert [o.rank for o in a.outcomes] == [o.rank for o in b.outcomes]
    assert [o.generated for o in a.outcomes] == [o.generated for o in b.outcomes]
