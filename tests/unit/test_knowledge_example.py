"""The knowledge-retention experiment end to end at a toy size: data, three models pretrained, instruction-tuned
and evaluated, the summary, and a second invocation that resumes instead of retraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = ["people=50", "bios_per_person=2", "chat_people=6", "chats=60", "vocab_size=512", "generic_docs=50",
       "micro_batch=2", "global_batch=2", "train_iters=8", "finetune_iters=2", "num_layers=2", "hidden_size=32",
       "num_heads=2", "num_query_groups=1", "ffn_hidden_size=64", "memory_layers=1", "num_chapters=9",
       "chapter_size=4", "top_k=2", "chunk_size=8", "max_candidates=4"]


def run_example(out: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "examples", "knowledge_retention.py"), "--out", out, "--seeds", "1",
           "--jobs", "2", "--set", *TOY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_knowledge_example_runs_and_resumes(tmp_path):
    out = str(tmp_path / "knowledge")
    first = run_example(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert sorted(r["model"] for r in summary["runs"]) == ["backbone", "dense_iso", "moc"]
    dense = summary["dense_iso"]
    assert dense["flops"] > dense["backbone_flops"] and abs(dense["ratio"] - 1) < 0.1, dense
    for run in summary["runs"]:
        stages = [(e["stage"], e["iteration"]) for e in run["evals"]]
        assert stages == [("pretrain", 2), ("pretrain", 4), ("pretrain", 6), ("pretrain", 8), ("finetune", 2)], stages
        for e in run["evals"]:
            assert 0.0 <= e["overall"]["mc_accuracy"] <= 1.0 and e["overall"]["probes"] == 25 * 8
            assert ("routing" in e) == (run["model"] == "moc")  # the routing analysis at every MoC checkpoint
    moc_log = open(os.path.join(out, "moc_seed1", "log.txt")).read()
    finetune = next(line for line in moc_log.splitlines() if line.startswith("$ ") and "finetune_moc.py" in line)
    assert "--moc-freeze-bank" in finetune and "--moc-memory-lr 0.0" in finetune, finetune
    assert "--moc-routing-unit document" in moc_log and "--reset-attention-mask" in moc_log

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from knowledge_retention_report import collect_runs

    collected = str(tmp_path / "collected.json")
    assert collect_runs(out, collected) == 3
    runs = json.load(open(collected))
    assert set(runs) == {"moc_seed1", "dense_iso_seed1", "backbone_seed1"}
    assert "pretrain_moc.py" in runs["moc_seed1"]["pretrain_command"] and not runs["moc_seed1"]["pretrain_reused"]
    assert all("routes" not in layer for e in runs["moc_seed1"]["evals"] for layer in e["routing"].values())

    second = run_example(out)  # everything exists: nothing is trained again
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "pretrain moc" not in second.stdout and "finetune" not in second.stdout, second.stdout
    assert open(os.path.join(out, "moc_seed1", "log.txt")).read() == moc_log
