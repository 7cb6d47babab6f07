"""End to end: sentencepiece (BPE with its default normaliser: nmt_nfkc, extra-whitespace removal, dummy prefix;
byte fallback) -> preprocess_data.py -> pretrain_moc.py (the moc-tiny preset, shortened, chunk routing, a few
iterations) -> convert_checkpoint.py export -> plain transformers in a clean process: the tokenizer encodes like
sentencepiece, the vocabulary is the tokenizer's (not Megatron's padded one), the logits are Megatron's, and
greedy generation with and without the KV cache agree."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import hf_helpers as H  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

PROMPTS = ["  def f(x):\n\treturn x ** 2  # 42, 3.14\n", "Ada Lovelace was born in", "The"]


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("_pretrain_moc", REPO_ROOT / "pretrain_moc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_pretrained_model_with_default_sentencepiece_exports_and_generates(tmp_path, tiny_corpus, tiny_texts,
                                                                        run_tool, mcore_world):
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_texts), model_prefix=prefix, model_type="bpe",
                                   vocab_size=1000, byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)
    sp_model = prefix + ".model"
    vocab = spm.SentencePieceProcessor(model_file=sp_model).vocab_size()
    assert vocab % 128 != 0  # an odd vocabulary: Megatron pads it
    data = tmp_path / "data"
    assert run_tool("preprocess_data", "--input", tiny_corpus, "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", sp_model, "--append-eod", "--output-prefix", data, "--workers", "1",
                    "--no-progress") == 0
    ckpt = tmp_path / "ckpt"
    _pretrain_main()([
        "--preset", "moc-tiny", "--num-layers", "2", "--moc-memory-layers", "1", "--moc-routing-unit", "chunk",
        "--moc-chunk-size", "8", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "3", "--lr", "3e-3", "--data-path", f"{data}_text_document", "--split", "100,0,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--save", str(ckpt),
        "--save-interval", "3", "--eval-iters", "0", "--num-workers", "0", "--log-interval", "1",
        "--data-cache-path", str(tmp_path / "cache"),
    ])
    hf = tmp_path / "hf"
    assert run_tool("convert_checkpoint", "export", "--load", ckpt, "--output", hf) == 0
    assert json.load(open(hf / "config.json"))["vocab_size"] == vocab

    megatron = H.load_megatron_checkpoint(str(ckpt))
    x = torch.tensor([spm.SentencePieceProcessor(model_file=sp_model).encode(PROMPTS[1])])
    want = H.megatron_logits(megatron, x)
    assert want.shape[-1] > vocab  # Megatron's padded rows, dropped by the export
    torch.save({"x": x, "want": want[..., :vocab]}, tmp_path / "want.pt")

    script = (
        "import json, sys, torch, transformers, sentencepiece\n"
        "folder, sp_model, case, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
        "tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)\n"
        "out = {'same_ids': [tok(p, add_special_tokens=False)['input_ids'] == sp.encode(p) for p in prompts]}\n"
        "c = torch.load(case)\n"
        "with torch.no_grad():\n"
        "    out['logit_diff'] = (model(c['x']).logits - c['want']).abs().max().item()\n"
        "gen = []\n"
        "for p in prompts:\n"
        "    ids = tok(p, return_tensors='pt', add_special_tokens=False)\n"
        "    runs = [model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=u,\n"
        "                           pad_token_id=tok.pad_token_id)[0].tolist() for u in (True, False)]\n"
        "    gen.append(runs)\n"
        "out['generations'] = gen\n"
        "out['decoded'] = tok.decode(gen[0][0])\n"
        "out['bad'] = [m for m in sys.modules if m.split('.')[0] in ('moc_megatron', 'megatron')]\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-c", script, str(hf), sp_model, str(tmp_path / "want.pt"),
                          json.dumps(PROMPTS)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(out["same_ids"]) and not out["bad"]
    assert out["logit_diff"] <= 1e-4, out["logit_diff"]
    for cached, uncached in out["generations"]:
        assert cached == uncached and len(cached) > 0 and max(cached) < vocab
    assert out["decoded"].startswith(PROMPTS[0].strip()[:5])
