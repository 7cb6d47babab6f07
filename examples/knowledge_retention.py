"""Does the memory store knowledge? The knowledge-retention experiment (docs/knowledge.md).

Steps (each skipped when its outputs exist, so an interrupted run resumes):

1. data: a synthetic biography corpus of P people (several differently worded biographies each). Half of
   the people ("QA people") also appear as cloze question/answer sentences in the pretraining data, so the
   models learn the probe format; the other half ("probe people") are only ever described by biographies,
   and their probes (worded unlike any corpus sentence) are what recall is measured on. Plus generic text
   (CPython's documentation, a held-out part of it for validation loss) and chat conversations about
   *other* fictional people (the instruction-tuning data restates no probed fact).
2. pretrain three models on the same token stream (same data, seed and order): a small MoC model, its
   backbone without memory, and a dense model with the MoC model's forward+backward FLOPs per token
   (depth, then width, chosen with moc_megatron.model.flops, the accounting of tools/estimate_flops.py);
   checkpoints at four points for the recall-vs-tokens curve.
3. instruction-tune each with finetune_moc.py (the paper's IFT schedule; the MoC model's memory layers and
   bank are kept fixed, ``ft_memory_lr=0 ft_freeze_bank=1``; the paper's lower memory/bank LRs with
   ``--set ft_memory_lr=1.5e-4 ft_freeze_bank=0``).
4. evaluate every checkpoint with moc_megatron.eval (greedy exact match, multiple-choice rank among the
   attribute's values, validation loss) and record the MoC model's chapter choices for the probes.
5. repeat for every seed; write summary.json (and, with --report, the plots and a table).

    python examples/knowledge_retention.py                      # CPU default, seeds 1 2 3, runs/knowledge
    python examples/knowledge_retention.py --scale gpu          # larger version for a GPU
    python examples/knowledge_retention.py --report docs/knowledge   # + plots/summary into docs/knowledge
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Scale:
    """Sizes of one version of the experiment."""

    people: int = 80
    bios_per_person: int = 4
    chat_people: int = 100
    chats: int = 600
    vocab_size: int = 2048
    generic_docs: int = 400
    seq_length: int = 128
    micro_batch: int = 16
    global_batch: int = 16
    train_iters: int = 800
    finetune_iters: int = 150
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    memory_layers: tuple[int, ...] = (1, 3)
    num_chapters: int = 257
    chapter_size: int = 16
    top_k: int = 4
    routing_unit: str = "document"
    chunk_size: int = 16
    """``--moc-chunk-size``: chunk routing's chunks, document routing's read pieces."""
    reset_attention_mask: bool = True
    """Documents separated (``--reset-attention-mask --reset-position-ids``) for every model."""
    lr: float = 3e-3
    memory_lr: float = 6e-3
    bank_lr: float = 6e-3
    ft_lr: float = 3e-4
    ft_memory_lr: float = 0.0
    """Instruction tuning keeps the memory layers (LR 0) and the bank (frozen) fixed: it moved MoC's routes less and
    lost 2 pp less recall than the paper's 1 : 1/2 : 1/6 LRs (``ft_memory_lr=1.5e-4 ft_freeze_bank=0``),
    docs/knowledge.md."""
    ft_bank_lr: float = 5e-5
    """Used only with ``ft_freeze_bank=0``."""
    ft_freeze_bank: bool = True
    max_candidates: int = 10
    mix: tuple[float, float, float] = (0.75, 0.15, 0.1)
    """Blend weights of biographies, QA sentences of the QA people, generic text."""


SCALES = {
    "cpu": Scale(),
    "gpu": Scale(people=4000, bios_per_person=6, chat_people=1000, chats=20000, vocab_size=8192, generic_docs=4000,
                 seq_length=512, micro_batch=32, global_batch=64, train_iters=6000, finetune_iters=1000,
                 num_layers=8, hidden_size=512, num_heads=8, num_query_groups=4, ffn_hidden_size=1536,
                 memory_layers=(1, 3, 5, 7), num_chapters=1025, chapter_size=32, top_k=8, lr=1e-3,
                 memory_lr=2e-3, bank_lr=2e-3, ft_lr=1e-4, ft_bank_lr=1.7e-5,
                 max_candidates=20),
}

MODELS = ("moc", "dense_iso", "backbone")


@dataclass
class Paths:
    """Where everything of one experiment lives."""

    out: str

    def data(self, name: str) -> str:
        """A file under ``out/data``."""
        return os.path.join(self.out, "data", name)

    def run(self, model: str, seed: int) -> str:
        return os.path.join(self.out, f"{model}_seed{seed}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], logfile: str, threads: int) -> None:
    """Run ``cmd`` (output to ``logfile``); raise with the log's tail if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    with open(logfile, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = open(logfile).read()[-3000:]
        raise RuntimeError(f"command failed ({rc}): {shlex.join(cmd)}\n--- {logfile} ---\n{tail}")


# --------------------------------------------------------------------------------------------- data


# Probes worded as the biographies are (the first corpus template of each attribute, cut before the value):
# they measure memorisation of the biographies; the held-out probes measure knowledge that can be asked for.
BIO_PROMPTS = {
    "birth_date": ("{name} was born on", "{v}"),
    "birth_city": ("{name} was born in", "{v}"),
    "university": ("{name} studied at", "{v}"),
    "major": ("{name} majored in", "{v}"),
    "profession": ("{name} works as", "{article} {v}"),
    "employer": ("{name} works for", "{v}"),
    "favourite_colour": ("{name}'s favourite colour is", "{v}"),
    "hobby": ("{name}'s favourite hobby is", "{v}"),
}


def bio_probes(people) -> list[dict]:
    """One corpus-worded cloze probe per person and attribute (same fields as the held-out probes)."""
    out = []
    for index, person in enumerate(people):
        for attribute, (prompt, answer) in BIO_PROMPTS.items():
            value = person.value(attribute)
            answer = answer.format(v=value, article="an" if value[0] in "aeiou" else "a")
            out.append({"id": f"bio-person{index:06d}-{attribute}", "person": person.name, "attribute": attribute,
                        "prompt": prompt.format(name=person.name), "completion": " " + answer})
    return out


def build_data(paths: Paths, scale: Scale, threads: int) -> None:
    """Corpus, probes, chats, tokenizer and the Megatron datasets (skipped if already built)."""
    from moc_megatron.data.jsonl import write_jsonl
    from moc_megatron.data.synthetic_corpus import corpus_documents, generate_people, probes, synthetic_chats
    from moc_megatron.data.text_corpus import text_corpus_documents

    os.makedirs(paths.data(""), exist_ok=True)
    if os.path.exists(paths.data("DONE")):
        return
    log(f"data: {scale.people} people x {scale.bios_per_person} biographies, generic text, chats")
    everyone = generate_people(scale.people + scale.chat_people, seed=1234)
    people, chat_people = everyone[: scale.people], everyone[scale.people:]
    qa_people, probe_people = people[: scale.people // 2], people[scale.people // 2:]
    write_jsonl(paths.data("bios.jsonl"), corpus_documents(people, scale.bios_per_person, seed=1234))
    all_probes = list(probes(people))
    qa_names = {p.name for p in qa_people}
    write_jsonl(paths.data("all_probes.jsonl"), all_probes)
    write_jsonl(paths.data("probes.jsonl"), [p for p in all_probes if p["person"] not in qa_names])
    write_jsonl(paths.data("all_bio_probes.jsonl"), bio_probes(people))
    write_jsonl(paths.data("bio_probes.jsonl"), bio_probes(probe_people))
    qa_docs = []
    for name in sorted(qa_names):
        lines = [p["prompt"] + p["completion"] + "." for p in all_probes if p["person"] == name]
        qa_docs.append({"id": f"qa-{name}", "text": " ".join(lines)})
    random.Random(0).shuffle(qa_docs)
    write_jsonl(paths.data("qa.jsonl"), qa_docs)
    docs = list(text_corpus_documents())
    random.Random(0).shuffle(docs)
    n_valid = max(8, len(docs) // 20)
    write_jsonl(paths.data("generic_valid.jsonl"), docs[:n_valid])
    write_jsonl(paths.data("generic.jsonl"), docs[n_valid:n_valid + scale.generic_docs])
    write_jsonl(paths.data("chat.jsonl"), synthetic_chats(chat_people, scale.chats, seed=99))
    with open(paths.data("split.json"), "w") as f:
        json.dump({"qa_people": sorted(qa_names), "probe_people": [p.name for p in probe_people],
                   "chat_people": [p.name for p in chat_people]}, f, indent=1)
    logfile = paths.data("data.log")
    py = sys.executable
    sources = [paths.data(name) for name in ("bios.jsonl", "generic.jsonl", "qa.jsonl")]
    sh([py, "tools/train_tokenizer.py", "--input", *sources,
        "--model-prefix", paths.data("tokenizer"), "--vocab-size", str(scale.vocab_size)], logfile, threads)
    tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths.data("tokenizer") + ".model"]
    for name in ("bios", "qa", "generic", "generic_valid"):
        sh([py, "tools/preprocess_data.py", "--input", paths.data(name + ".jsonl"), "--output-prefix",
            paths.data(name), *tok, "--append-eod", "--workers", "1"], logfile, threads)
    sh([py, "tools/preprocess_sft.py", "--input", paths.data("chat.jsonl"), "--output-prefix", paths.data("chat"), *tok,
        "--pack-length", str(scale.seq_length), "--workers", "1"], logfile, threads)
    open(paths.data("DONE"), "w").close()


# --------------------------------------------------------------------------------------------- models


def model_fields(scale: Scale, model: str, dense_layers: int | None = None, dense_ffn: int | None = None) -> dict:
    """MoCConfig fields of one of the three models."""
    fields = dict(num_layers=scale.num_layers, hidden_size=scale.hidden_size, num_attention_heads=scale.num_heads,
                  num_query_groups=scale.num_query_groups, ffn_hidden_size=scale.ffn_hidden_size)
    if model == "moc":
        fields.update(moc_memory_layers=list(scale.memory_layers), moc_num_chapters=scale.num_chapters,
                      moc_chapter_size=scale.chapter_size, moc_num_shared_chapters=1, moc_top_k=scale.top_k,
                      moc_num_heads=scale.num_heads, moc_routing_unit=scale.routing_unit,
                      moc_chunk_size=scale.chunk_size)
    elif model == "dense_iso":
        fields.update(num_layers=dense_layers, ffn_hidden_size=dense_ffn)
    return fields


def flops_per_sequence(fields: dict, scale: Scale, documents: float = 1.0) -> int:
    """Forward+backward FLOPs of one sequence (the paper's accounting, moc_megatron/model/flops.py), counting what
    the model computes: chapters projected once per micro-batch, one route per document of ``documents``."""
    import torch.nn.functional as F

    from moc_megatron.config import MoCConfig
    from moc_megatron.model.builder import pad_vocab_size
    from moc_megatron.model.flops import estimate_flops

    with warnings.catch_warnings():  # megatron's notice about CUDA-graph scopes: no graph is captured here
        warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
        config = MoCConfig(**fields, gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
                           normalization="RMSNorm", add_bias_linear=False, use_cpu_initialization=True,
                           perform_initialization=False, gradient_accumulation_fusion=False,
                           reset_attention_mask=scale.reset_attention_mask)
    return estimate_flops(config, pad_vocab_size(scale.vocab_size), scale.seq_length,
                          micro_batch_size=scale.micro_batch, documents=documents).forward_backward


def documents_per_sequence(paths: Paths, scale: Scale) -> float:
    """Documents in one packed window, on average: one, plus the document starts in ``seq_length`` tokens of the
    blend (each source contributes its share of tokens divided by its mean document length)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    starts = 0.0
    for weight, name in zip(scale.mix, ("bios", "qa", "generic")):
        dataset = IndexedDataset(paths.data(name + "_text_document"))  # holds the memory map the lengths live in
        lengths = dataset.sequence_lengths
        starts += weight / (float(lengths.sum()) / len(lengths))
        del lengths, dataset
    return 1.0 + scale.seq_length * starts / sum(scale.mix)


def iso_flop_dense(scale: Scale, documents: float = 1.0) -> dict:
    """The dense model of (nearly) the MoC model's FLOPs: among the (depth, FFN width) pairs within 2 % of them, the
    FFN width nearest the backbone's (so more layers first); if none is within 2 %, the pair nearest in FLOPs."""
    target = flops_per_sequence(model_fields(scale, "moc"), scale, documents)
    best = None
    for layers in range(scale.num_layers, 3 * scale.num_layers + 1):
        for ffn in range(max(32, scale.ffn_hidden_size // 2), 3 * scale.ffn_hidden_size + 1, 32):
            flops = flops_per_sequence(model_fields(scale, "dense_iso", layers, ffn), scale)
            error = abs(flops / target - 1)
            # within 2 %: the FFN width nearest the backbone's; none within 2 % (toy sizes): the nearest FLOPs
            key = (0, abs(ffn - scale.ffn_hidden_size), error) if error <= 0.02 else (1, error, 0)
            if best is None or key < best[0]:
                best = (key, layers, ffn, flops)
    _, layers, ffn, flops = best
    return dict(num_layers=layers, ffn_hidden_size=ffn, flops=flops, moc_flops=target, ratio=flops / target,
                backbone_flops=flops_per_sequence(model_fields(scale, "backbone"), scale),
                documents_per_sequence=documents)


def model_flags(fields: dict) -> list[str]:
    """pretrain_moc.py flags of a model."""
    flags = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear"]
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return flags


# --------------------------------------------------------------------------------------------- training


@dataclass
class RunSpec:
    """One model at one seed: its flags and where it goes."""

    model: str
    seed: int
    fields: dict
    extra: list[str] = field(default_factory=list)


def pretrain_cmd(paths: Paths, scale: Scale, spec: RunSpec, run: str) -> list[str]:
    """The pretrain_moc.py command of a run (same data, order and seed for every model)."""
    w = scale.mix
    interval = max(1, scale.train_iters // 4)
    memory = ["--moc-memory-lr", str(scale.memory_lr), "--moc-bank-lr", str(scale.bank_lr)] \
        if spec.model == "moc" else []
    separated = ["--reset-attention-mask", "--reset-position-ids"] if scale.reset_attention_mask else []
    return [sys.executable, "pretrain_moc.py", *model_flags(spec.fields), *memory, *separated, *spec.extra,
            "--seq-length", str(scale.seq_length), "--max-position-embeddings", str(scale.seq_length),
            "--data-path", str(w[0]), paths.data("bios_text_document"), str(w[1]), paths.data("qa_text_document"),
            str(w[2]), paths.data("generic_text_document"), "--split", "98,2,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths.data("tokenizer") + ".model",
            "--micro-batch-size", str(scale.micro_batch), "--global-batch-size", str(scale.global_batch),
            "--train-iters", str(scale.train_iters), "--lr", str(scale.lr), "--min-lr", str(scale.lr / 10),
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, scale.train_iters // 30)),
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", str(spec.seed),
            "--log-interval", str(max(1, scale.train_iters // 10)), "--eval-interval", str(scale.train_iters),
            "--eval-iters", "2", "--num-workers", "0", "--save", os.path.join(run, "pretrain"),
            "--save-interval", str(interval)]


def finetune_cmd(paths: Paths, scale: Scale, spec: RunSpec, run: str) -> list[str]:
    """The finetune_moc.py command: IFT on chats about other people, memory/bank at lower LR."""
    memory = []
    if spec.model == "moc":
        memory = ["--moc-memory-lr", str(scale.ft_memory_lr)]
        memory += ["--moc-freeze-bank"] if scale.ft_freeze_bank else ["--moc-bank-lr", str(scale.ft_bank_lr)]
    separated = ["--reset-attention-mask"] if scale.reset_attention_mask else []
    return [sys.executable, "finetune_moc.py", *model_flags(spec.fields), *memory, *separated, *spec.extra,
            "--seq-length", str(scale.seq_length), "--max-position-embeddings", str(scale.seq_length),
            "--pretrained-checkpoint", os.path.join(run, "pretrain"), "--sft-data-path", paths.data("chat"),
            "--split", "98,2,0", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", paths.data("tokenizer") + ".model", "--micro-batch-size", str(scale.micro_batch),
            "--global-batch-size", str(scale.global_batch), "--train-iters", str(scale.finetune_iters),
            "--lr", str(scale.ft_lr), "--min-lr", str(scale.ft_lr / 10), "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(max(1, scale.finetune_iters // 15)), "--weight-decay", "0.1",
            "--clip-grad", "1.0", "--seed", str(spec.seed), "--log-interval", str(max(1, scale.finetune_iters // 5)),
            "--eval-interval", str(scale.finetune_iters), "--eval-iters", "1", "--num-workers", "0",
            "--save", os.path.join(run, "finetune"), "--save-interval", str(scale.finetune_iters)]


def evaluate_run(paths: Paths, scale: Scale, run: str) -> None:
    """Evaluate every checkpoint of a run (in this process) into ``run/eval.json``."""
    from moc_megatron.eval.evaluate import EvalSettings, evaluate_model
    from moc_megatron.eval.models import load_megatron
    from moc_megatron.eval.probes import load_probes
    from moc_megatron.eval.routing import memory_routers

    settings = EvalSettings(probes=paths.data("probes.jsonl"), candidates=paths.data("all_probes.jsonl"),
                            max_candidates=scale.max_candidates, valid_data=paths.data("generic_valid_text_document"),
                            valid_seq_length=scale.seq_length, valid_max_sequences=32)
    bio_settings = replace(settings, probes=paths.data("bio_probes.jsonl"),
                           candidates=paths.data("all_bio_probes.jsonl"), valid_data=None)
    probes = load_probes(paths.data("probes.jsonl"))
    bios = probe_people_bios(paths, probes)
    results = []
    tokens_per_iter = scale.global_batch * scale.seq_length
    for stage in ("pretrain", "finetune"):
        root = os.path.join(run, stage)
        iters = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
        if stage == "pretrain" and os.path.islink(root):  # --reuse-pretrain: only the final pretrain checkpoint
            iters = iters[-1:]
        for it in iters:
            model = load_megatron(root, it)
            report = evaluate_model(model, settings)
            entry = dict(stage=stage, iteration=it, pretrain_tokens=(it if stage == "pretrain" else
                                                                     scale.train_iters) * tokens_per_iter,
                         **report.to_dict())
            bio = evaluate_model(model, bio_settings)
            entry["bio"] = bio.to_dict()
            final = stage == "finetune" or it == iters[-1]
            if final:
                entry["outcomes"] = [dict(attribute=o.attribute, person=o.person, exact=o.exact, rank=o.rank)
                                     for o in report.outcomes]
            if memory_routers(model.module):  # every checkpoint: how the routing forms during pretraining
                entry.update(where_facts_go(model, probes, bios))
            if final and memory_routers(model.module):
                log(f"  {os.path.basename(run)} {stage}: " + "; ".join(
                    f"layer {layer}: distinct {r['distinct']:.1f} (shuffled {r['distinct_shuffled']:.1f}), "
                    f"bio overlap {r['bio_overlap']['overlap']:.2f} (others {r['bio_overlap']['overlap_other']:.2f}), "
                    f"memory/residual {entry['memory_contribution'][layer]:.3f}"
                    for layer, r in entry["routing"].items()))
            results.append(entry)
            log(f"  {os.path.basename(run)} {stage} iter {it}: mc {report.overall.mc_accuracy:.3f} "
                f"exact {report.overall.exact_match:.3f} valid {report.validation_loss:.3f} | corpus-worded probes: "
                f"mc {bio.overall.mc_accuracy:.3f} exact {bio.overall.exact_match:.3f}")
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump(results, f)


def probe_people_bios(paths: Paths, probes) -> list[tuple[str, str]]:
    """``(person, biography text)`` of every biography of the probed people (bios.jsonl ids name the person's
    index, as the probe ids do)."""
    person_of = {p.id.rsplit("-", 1)[0]: p.person for p in probes if p.id}
    with open(paths.data("bios.jsonl")) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return [(person_of[d["id"].rsplit("-", 1)[0]], d["text"]) for d in docs if d["id"].rsplit("-", 1)[0] in person_of]


def where_facts_go(model, probes, bios: list[tuple[str, str]]) -> dict:
    """Per memory layer: how a person's probes group on chapters (``routing``), whether they read the chapters that
    person's biographies select (``routing[layer]["bio_overlap"]``), and how much the memory writes into the
    residual stream on the probe prompts (``memory_contribution``)."""
    from moc_megatron.eval.routing import (
        document_probe_overlap,
        memory_contribution,
        person_concentration,
        prompt_routes,
    )

    persons = [p.person for p in probes]
    routes = prompt_routes(model, [p.prompt for p in probes])
    bio_routes = prompt_routes(model, [text for _, text in bios])
    num_routed = model.module.config.moc_num_routed_chapters
    routing = {}
    for layer, r in routes.items():
        overlap = document_probe_overlap(persons, r, [person for person, _ in bios], bio_routes[layer])
        routing[str(layer)] = dict(person_concentration(persons, r, num_routed), routes=r, bio_overlap=overlap)
    contribution = memory_contribution(model, [p.prompt for p in probes])
    return dict(routing=routing, memory_contribution={str(k): v for k, v in contribution.items()})


def run_one(paths: Paths, scale: Scale, spec: RunSpec, threads: int, tag: str) -> str:
    """Pretrain, fine-tune and evaluate one (model, seed); returns the run directory."""
    run = paths.run(spec.model + tag, spec.seed)
    os.makedirs(run, exist_ok=True)
    logfile = os.path.join(run, "log.txt")
    t0 = time.time()
    if not os.path.exists(os.path.join(run, "pretrain", "latest_checkpointed_iteration.txt")):
        log(f"pretrain {spec.model}{tag} seed {spec.seed}")
        sh(pretrain_cmd(paths, scale, spec, run), logfile, threads)
    t1 = time.time()
    if not os.path.exists(os.path.join(run, "finetune", "latest_checkpointed_iteration.txt")):
        log(f"finetune {spec.model}{tag} seed {spec.seed}")
        sh(finetune_cmd(paths, scale, spec, run), logfile, threads)
    t2 = time.time()
    if not os.path.exists(os.path.join(run, "eval.json")):
        log(f"evaluate {spec.model}{tag} seed {spec.seed}")
        sh([sys.executable, os.path.abspath(__file__), "--eval-run", run, "--out", paths.out,
            "--scale-json", json.dumps(asdict(scale))], logfile, threads)
    t3 = time.time()
    timing_file = os.path.join(run, "timing.json")
    if not os.path.exists(timing_file):
        with open(timing_file, "w") as f:
            json.dump(dict(pretrain_s=t1 - t0, finetune_s=t2 - t1, eval_s=t3 - t2), f)
    log(f"done {spec.model}{tag} seed {spec.seed} ({t3 - t0:.0f} s)")
    return run


# --------------------------------------------------------------------------------------------- summary


def summarize(paths: Paths, scale: Scale, specs: list[RunSpec], tag: str, dense: dict, wall_s: float) -> dict:
    """Collect every run's evaluation into one summary (written to ``out/summary{tag}.json``)."""
    runs = []
    for spec in specs:
        run = paths.run(spec.model + tag, spec.seed)
        with open(os.path.join(run, "eval.json")) as f:
            evals = json.load(f)
        timing = json.load(open(os.path.join(run, "timing.json")))
        runs.append(dict(model=spec.model, seed=spec.seed, fields=spec.fields, extra=spec.extra, evals=evals,
                         timing=timing))
    summary = dict(scale=asdict(scale), tag=tag, dense_iso=dense, wall_s=wall_s, runs=runs,
                   machine=os.environ.get("KNOWLEDGE_MACHINE", f"{os.cpu_count()}-core CPU"))
    with open(os.path.join(paths.out, f"summary{tag}.json"), "w") as f:
        json.dump(summary, f)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "knowledge"), help="experiment directory")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="cpu: the default (one seed, three models two at a time: 14.7 min on the idle 2-core CPU "
                        "machine, so about 45 min for three seeds; docs/knowledge.md); gpu: a larger version for "
                        "one GPU (not run yet)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override Scale fields (e.g. train_iters=300 top_k=8 ft_freeze_bank=0)")
    p.add_argument("--moc-extra", default="", help="extra pretrain/finetune flags for the MoC model only")
    p.add_argument("--tag", default="", help="suffix of the run directories (lever experiments)")
    p.add_argument("--reuse-pretrain", metavar="TAG", default=None,
                   help="link each run's pretraining from the runs of TAG ('' = the base runs) and only fine-tune "
                        "(fine-tuning levers: --set ft_memory_lr=1.5e-4 ft_freeze_bank=0 ...)")
    p.add_argument("--report", metavar="DIR", help="afterwards write plots + summary into DIR (needs matplotlib)")
    p.add_argument("--eval-run", help=argparse.SUPPRESS)
    p.add_argument("--scale-json", help=argparse.SUPPRESS)
    return p


def apply_overrides(scale: Scale, items: list[str]) -> Scale:
    """``FIELD=VALUE`` overrides of a Scale, typed like the field."""
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in Scale.__dataclass_fields__:
            raise SystemExit(f"--set {item}: no field {name!r}; fields: {', '.join(Scale.__dataclass_fields__)}")
        current = getattr(scale, name)
        if isinstance(current, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            changes[name] = tuple(type(current[0])(v) for v in value.split(","))
        else:
            changes[name] = type(current)(value)
    return replace(scale, **changes)


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; returns the exit status."""
    args = build_parser().parse_args(argv)
    paths = Paths(os.path.abspath(args.out))
    if args.eval_run:
        fields = json.loads(args.scale_json)
        scale = Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        evaluate_run(paths, scale, args.eval_run)
        return 0
    scale = apply_overrides(SCALES[args.scale], args.set)
    os.makedirs(paths.out, exist_ok=True)
    start = time.time()
    build_data(paths, scale, args.threads)
    dense = iso_flop_dense(scale, documents_per_sequence(paths, scale))
    log(f"iso-FLOP dense: {dense['num_layers']} layers, ffn {dense['ffn_hidden_size']} "
        f"({dense['flops']:.3e} vs MoC {dense['moc_flops']:.3e} FLOPs/sequence, ratio {dense['ratio']:.3f}; "
        f"backbone {dense['backbone_flops']:.3e})")
    specs = []
    for seed in args.seeds:
        for model in args.models:
            fields = model_fields(scale, model, dense["num_layers"], dense["ffn_hidden_size"])
            extra = shlex.split(args.moc_extra) if model == "moc" else []
            specs.append(RunSpec(model, seed, fields, extra))
    if args.reuse_pretrain is not None:
        for spec in specs:
            run = paths.run(spec.model + args.tag, spec.seed)
            base = paths.run(spec.model + args.reuse_pretrain, spec.seed)
            os.makedirs(run, exist_ok=True)
            if not os.path.exists(os.path.join(run, "pretrain")):
                os.symlink(os.path.join(base, "pretrain"), os.path.join(run, "pretrain"))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda s: run_one(paths, scale, s, args.threads, args.tag), specs))
    summary = summarize(paths, scale, specs, args.tag, dense, time.time() - start)
    log(f"all runs done in {summary['wall_s'] / 60:.1f} min; summary in {paths.out}/summary{args.tag}.json")
    if args.report:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from knowledge_retention_report import write_report

        write_report(summary, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
