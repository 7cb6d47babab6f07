"""Plots and tables of the knowledge-retention experiment (needs matplotlib: ``pip install -e ".[plots]"``).

    python examples/knowledge_retention_report.py runs/knowledge/summary.json docs/knowledge

writes ``results.json`` (the numbers of every run, mean and spread over seeds), ``table.md`` and the PNGs
``recall_vs_tokens.png``, ``forgetting.png`` and ``routing.png`` into the output folder.

    python examples/knowledge_retention_report.py --collect runs/knowledge_doc docs/knowledge/results_documents.json

collects every run of an experiment folder (base runs and ``--tag`` variants) into one JSON file.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

LABELS = {"moc": "MoC", "dense_iso": "dense (iso-FLOP)", "backbone": "backbone (no memory)"}
COLOURS = {"moc": "tab:red", "dense_iso": "tab:blue", "backbone": "tab:grey"}
METRICS = ("mc_accuracy", "exact_match", "mean_reciprocal_rank")
FORGET = ("mc_accuracy", "exact_match", "bio_mc_accuracy", "bio_exact_match")
PANELS = (("mc_accuracy", "held-out probes: MC accuracy"), ("exact_match", "held-out probes: exact match"),
          ("bio_mc_accuracy", "corpus-worded probes: MC accuracy"), ("bio_exact_match", "corpus-worded: exact match"))


def _stats(values: list[float]) -> dict:
    return dict(mean=statistics.fmean(values), sd=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), values=values)


def compact(summary: dict) -> dict:
    """Per run: recall after pretraining and after tuning, validation loss, the curve; then mean/spread."""
    runs = []
    for run in summary["runs"]:
        evals = run["evals"]
        pre = [e for e in evals if e["stage"] == "pretrain"]
        post = [e for e in evals if e["stage"] == "finetune"][-1]
        final = pre[-1]
        entry = dict(model=run["model"], seed=run["seed"], timing=run["timing"], extra=run.get("extra", []),
                     curve=[dict(tokens=e["pretrain_tokens"], iteration=e["iteration"],
                                 **{m: e["overall"][m] for m in METRICS},
                                 **{f"bio_{m}": e["bio"]["overall"][m] for m in METRICS if "bio" in e}) for e in pre])
        for name, e in (("pretrain", final), ("finetune", post)):
            entry[name] = dict(**{m: e["overall"][m] for m in METRICS}, validation_loss=e["validation_loss"],
                               chance=e["overall"]["chance_mc_accuracy"],
                               by_attribute={a: s["mc_accuracy"] for a, s in e["by_attribute"].items()},
                               **{f"bio_{m}": e["bio"]["overall"][m] for m in METRICS if "bio" in e})
            if "routing" in e:
                entry[name]["routing"] = {layer: {k: v for k, v in r.items() if k not in ("routes", "usage")}
                                          for layer, r in e["routing"].items()}
        for m in FORGET:
            if m in entry["pretrain"]:
                entry[f"forgetting_{m}"] = entry["pretrain"][m] - entry["finetune"][m]
        runs.append(entry)
    by_model: dict[str, dict] = defaultdict(dict)
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        for stage in ("pretrain", "finetune"):
            for key in (*METRICS, *(f"bio_{m}" for m in METRICS), "validation_loss"):
                if key in mine[0][stage]:
                    by_model[model][f"{stage}_{key}"] = _stats([r[stage][key] for r in mine])
        for m in FORGET:
            if f"forgetting_{m}" in mine[0]:
                by_model[model][f"forgetting_{m}"] = _stats([r[f"forgetting_{m}"] for r in mine])
    out = dict(scale=summary["scale"], dense_iso=summary["dense_iso"], wall_s=summary["wall_s"],
               machine=summary.get("machine"), seeds=sorted({r["seed"] for r in runs}), runs=runs,
               by_model=dict(by_model))
    if "moc" in by_model and "dense_iso" in by_model:
        moc, dense = by_model["moc"], by_model["dense_iso"]
        gap = {m: moc[f"pretrain_{m}"]["mean"] - dense[f"pretrain_{m}"]["mean"]
               for m in FORGET if f"pretrain_{m}" in moc}
        out["target"] = dict(
            recall_gap_pp={m: 100 * v for m, v in gap.items()},
            recall_gap_met={m: v >= 0.10 for m, v in gap.items()},
            forgetting_ratio={m: (moc[f"forgetting_{m}"]["mean"] / dense[f"forgetting_{m}"]["mean"]
                                  if dense[f"forgetting_{m}"]["mean"] > 0 else None)
                              for m in gap},
        )
    return out


def table(results: dict) -> str:
    """Markdown table: recall before/after tuning and validation loss, mean ± sd over seeds."""
    def cell(s: dict, pct: bool = True) -> str:
        if pct:
            return f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f}"
        return f"{s['mean']:.3f} ± {s['sd']:.3f}"

    lines = ["| model | MC acc. pretrain | MC acc. after IFT | forgetting (pp) | exact pretrain | exact after IFT "
             "| corpus-worded MC pretrain | after IFT | forgetting (pp) | valid loss pretrain | valid loss after IFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("moc", "dense_iso", "backbone"):
        s = results["by_model"].get(model)
        if s is None:
            continue
        lines.append(f"| {LABELS[model]} | {cell(s['pretrain_mc_accuracy'])} | {cell(s['finetune_mc_accuracy'])} | "
                     f"{cell(s['forgetting_mc_accuracy'])} | {cell(s['pretrain_exact_match'])} | "
                     f"{cell(s['finetune_exact_match'])} | {cell(s['pretrain_bio_mc_accuracy'])} | "
                     f"{cell(s['finetune_bio_mc_accuracy'])} | {cell(s['forgetting_bio_mc_accuracy'])} | "
                     f"{cell(s['pretrain_validation_loss'], False)} | "
                     f"{cell(s['finetune_validation_loss'], False)} |")
    return "\n".join(lines)


def _plot_curves(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    axes = axes.flatten()
    for ax, (metric, title) in zip(axes, PANELS):
        for model in ("moc", "dense_iso", "backbone"):
            runs = [r for r in results["runs"] if r["model"] == model]
            if not runs:
                continue
            tokens = [p["tokens"] / 1e6 for p in runs[0]["curve"]]
            per_point = list(zip(*[[p[metric] for p in r["curve"]] for r in runs]))
            mean = [100 * statistics.fmean(v) for v in per_point]
            ax.plot(tokens, mean, "o-", color=COLOURS[model], label=LABELS[model])
            ax.fill_between(tokens, [100 * min(v) for v in per_point], [100 * max(v) for v in per_point],
                            color=COLOURS[model], alpha=0.2)
        if "mc" in metric:
            ax.axhline(100 * results["runs"][0]["pretrain"]["chance"], color="k", ls=":", lw=1, label="chance")
        ax.set_xlabel("pretraining tokens (M)")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_forgetting(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    axes = axes.flatten()
    models = [m for m in ("moc", "dense_iso", "backbone") if m in results["by_model"]]
    for ax, (metric, title) in zip(axes, PANELS):
        for i, model in enumerate(models):
            s = results["by_model"][model]
            for j, stage in enumerate(("pretrain", "finetune")):
                x = i * 3 + j
                ax.bar(x, 100 * s[f"{stage}_{metric}"]["mean"], color=COLOURS[model], alpha=1.0 if j == 0 else 0.5)
                values = s[f"{stage}_{metric}"]["values"]
                ax.plot([x] * len(values), [100 * v for v in values], "k.", ms=6)
        ax.set_xticks([i * 3 + 0.5 for i in range(len(models))], [LABELS[m] for m in models], fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(f"{title}\nafter pretraining (solid) / after IFT (light)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_routing(summary: dict, path: str, people: int = 30) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    moc = [r for r in summary["runs"] if r["model"] == "moc"]
    if not moc:
        return
    final = [e for e in moc[0]["evals"] if e["stage"] == "pretrain"][-1]
    layers = sorted(final["routing"], key=int)
    outcomes = final["outcomes"]
    names = list(dict.fromkeys(o["person"] for o in outcomes))[:people]
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4.2 * (len(layers) + 1), 4.2))
    for ax, layer in zip(axes, layers):
        r = final["routing"][layer]
        routes = r["routes"]
        grid = np.zeros((len(names), r["num_routed_chapters"]))
        for o, chapters in zip(outcomes, routes):
            if o["person"] in names:
                for c in chapters:
                    grid[names.index(o["person"]), c] += 1
        used = np.where(grid.sum(0) > 0)[0]
        ax.imshow(grid[:, used], aspect="auto", cmap="Reds", interpolation="nearest")
        ax.set_title(f"layer {layer}: chapters read by each person's 8 probes\n"
                     f"({len(used)} of {r['num_routed_chapters']} chapters shown)", fontsize=8)
        ax.set_xlabel("routed chapter (used ones)")
        ax.set_ylabel(f"person (first {len(names)} probe people)")
        ax.set_yticks([])
    ax = axes[-1]
    labels, real, shuffled = [], [], []
    for run in moc:
        for e in run["evals"]:
            if "routing" not in e:
                continue
            for layer in sorted(e["routing"], key=int):
                r = e["routing"][layer]
                labels.append(f"s{run['seed']} {e['stage'][:3]} L{layer}")
                real.append(r["distinct"])
                shuffled.append(r["distinct_shuffled"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, real, 0.4, label="a person's 8 probes", color="tab:red")
    ax.bar(x + 0.2, shuffled, 0.4, label="8 random probes", color="tab:grey")
    ax.set_xticks(x, labels, rotation=60, fontsize=7)
    ax.set_ylabel("distinct chapters selected")
    ax.set_title("distinct chapters per person vs random groups", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(summary: dict, out_dir: str) -> dict:
    """Write results.json, table.md and the three PNGs into ``out_dir``; return the compact results."""
    os.makedirs(out_dir, exist_ok=True)
    tag = summary.get("tag", "")
    results = compact(summary)
    with open(os.path.join(out_dir, f"results{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f"table{tag}.md"), "w") as f:
        f.write(table(results) + "\n")
    _plot_curves(results, os.path.join(out_dir, f"recall_vs_tokens{tag}.png"))
    _plot_forgetting(results, os.path.join(out_dir, f"forgetting{tag}.png"))
    _plot_routing(summary, os.path.join(out_dir, f"routing{tag}.png"))
    print(table(results))
    return results


def collect_runs(experiment_dir: str, path: str) -> int:
    """Every run of an experiment folder (every ``*_seedN`` with an ``eval.json``: base runs and lever variants)
    into one JSON file: its evaluations without the per-probe outcomes and routes, its timing, its pretraining
    command and whether its pretraining was reused. Returns how many runs."""
    collected = {}
    for name in sorted(os.listdir(experiment_dir)):
        run = os.path.join(experiment_dir, name)
        if "_seed" not in name or not os.path.exists(os.path.join(run, "eval.json")):
            continue
        with open(os.path.join(run, "eval.json")) as f:
            evals = json.load(f)
        for entry in evals:
            entry.pop("outcomes", None)
            for layer in entry.get("routing", {}).values():
                layer.pop("routes", None)
                layer.pop("usage", None)
        timing_path = os.path.join(run, "timing.json")
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else None
        with open(os.path.join(run, "log.txt")) as f:
            first = f.readline()
        collected[name] = dict(evals=evals, timing=timing,
                               pretrain_command=first[2:].strip() if first.startswith("$ ") else None,
                               pretrain_reused=os.path.islink(os.path.join(run, "pretrain")))
    with open(path, "w") as f:
        json.dump(collected, f)
    return len(collected)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--collect":
        print(f"{collect_runs(sys.argv[2], sys.argv[3])} runs -> {sys.argv[3]}")
    elif len(sys.argv) == 3:
        with open(sys.argv[1]) as f:
            write_report(json.load(f), sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
