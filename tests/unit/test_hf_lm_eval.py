"""lm-evaluation-harness runs offline on an exported folder with a local multiple-choice task, and batch
size 1 and 4 give the same scores (its batches are right-padded and passed without an attention mask)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

import hf_helpers as H  # noqa: E402

from moc_megatron.hf.export import ExportOptions, export_checkpoint  # noqa: E402

QUESTIONS = [
    ("Ada Lovelace was born in", ["London", "Paris", "a small village near the sea"]),
    ("The capital of France is", ["Paris", "Rome", "Berlin, which is in Germany"]),
    ("Two plus two is", ["four", "five", "a number larger than ten"]),
    ("Python lists are", ["mutable", "immutable", "always sorted in increasing order"]),
    ("Water boils at", ["100 degrees", "10 degrees", "the top of a very high mountain"]),
]


def _task(folder):
    folder.mkdir()
    data = folder / "mc.jsonl"
    with open(data, "w") as f:
        for q, choices in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": 0}) + "\n")
    (folder / "moc_tiny_mc.yaml").write_text(
        "task: moc_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return folder


@pytest.mark.parametrize("unit", ["chunk", "sequence"])
def test_lm_eval_offline_batch_size_does_not_change_scores(tmp_path, sp_model, mcore_world, monkeypatch, unit):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, args, config, settings = H.megatron_model(["--vocab-size", "512", "--moc-routing-unit", unit])
    H.save_checkpoint(str(tmp_path / "ckpt"), model, args, config, settings)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "hf"), tokenizer_model=sp_model),
                      log=lambda *a: None)
    tasks = TaskManager(include_path=str(_task(tmp_path / "tasks")))
    scores = {}
    for bs in (1, 4):
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,"
                                      "dtype=float32", tasks=["moc_tiny_mc"], task_manager=tasks, batch_size=bs,
                                      device="cpu", log_samples=True)
        scores[bs] = [[r[0] for r in s["filtered_resps"]] for s in out["samples"]["moc_tiny_mc"]]
    for one, four in zip(scores[1], scores[4]):
        assert one == pytest.approx(four, abs=1e-4)
