"""An export carries the chat template and stops generation at the chat's end-of-turn token.

The sentencepiece tokenizer of the data tools (with the default template's ``<|end|>`` as one piece) is
trained, a tiny model is pretrained with it and exported; in the export ``generation_config.json`` lists
``<|end|>`` as an end-of-sequence token, ``generate()`` stops there, ``skip_special_tokens=True`` drops it
(and only it: the encoding is sentencepiece's), and transformers' ``apply_chat_template`` renders as the SFT
data were rendered. ``tools/generate.py --load`` (a Megatron checkpoint) stops and prints the same way,
and neither it nor the export prints torch's single-process notice or transformers' loading progress bar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moc_megatron.data.chat import DEFAULT_CHAT_TEMPLATE, encode_chat, end_of_turn  # noqa: E402
from moc_megatron.data.tokenizer import build_tokenizer  # noqa: E402
from moc_megatron.training.arguments import parse_run_config  # noqa: E402
from moc_megatron.training.loop import pretrain  # noqa: E402

CHAT = [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "In Lisbon."}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("chat_end")
    pretrain(parse_run_config([
        "--preset", "moc-tiny", "--num-layers", "2", "--moc-memory-layers", "1", "--seq-length", "32",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--mock-data",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
        "--eval-iters", "0", "--num-workers", "0", "--save", str(root / "ckpt")], world_size=1, exit_on_error=False))
    from moc_megatron.hf.export import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(root / "hf")), log=lambda *a: None)
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    return root, tok, end_of_turn(tok)[1]


class ForceToken:
    """A logits processor that makes ``token`` the only choice from the ``at``-th new token on."""

    def __init__(self, prompt_length: int, at: int, token: int) -> None:
        self.start, self.token = prompt_length + at, token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] >= self.start:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0.0
        return scores


def test_end_of_turn_of_the_default_template_is_one_token(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    text, token = end_of_turn(tok)
    assert text == "<|end|>" and tok.tokenize("<|end|>")[-1] == token


def test_export_stops_at_the_end_of_turn_and_hides_it(exported):
    root, tok, eot = exported
    hf = root / "hf"
    assert json.load(open(hf / "generation_config.json"))["eos_token_id"] == [tok.eod, eot]
    assert json.load(open(hf / "tokenizer_config.json"))["chat_template"] == DEFAULT_CHAT_TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    # the SFT data's rendering, token for token
    assert hf_tok.apply_chat_template(CHAT, tokenize=False) == "<|user|>\nWhere was Ada born?<|end|>\n" \
        "<|assistant|>\nIn Lisbon.<|end|>\n"
    assert hf_tok(hf_tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"] == \
        encode_chat(tok, CHAT)[0]
    prompt = hf_tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    length = prompt["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad,
                             logits_processor=transformers.LogitsProcessorList([ForceToken(length, 3, eot)]))
    new = out[0, length:].tolist()
    assert len(new) == 4 and new[-1] == eot  # stopped at <|end|>, not at max_new_tokens
    assert hf_tok.decode(new, skip_special_tokens=False).endswith("<|end|>")
    shown = hf_tok.decode(new, skip_special_tokens=True)
    assert "<|end|>" not in shown and shown == hf_tok.decode(new[:-1], skip_special_tokens=False)


def test_generate_tool_on_a_megatron_checkpoint_stops_and_hides_it(exported, run_tool, monkeypatch, capsys):
    root, tok, eot = exported
    real = transformers.GenerationMixin.generate

    def forced(self, input_ids=None, **kwargs):
        kwargs["logits_processor"] = transformers.LogitsProcessorList([ForceToken(input_ids.shape[1], 2, eot)])
        out = real(self, input_ids=input_ids, **kwargs)
        forced.lengths.append(out.shape[1] - input_ids.shape[1])
        return out

    forced.lengths = []
    monkeypatch.setattr(transformers.GenerationMixin, "generate", forced)
    capsys.readouterr()
    assert run_tool("generate", "--load", root / "ckpt", "--prompt", "Ada", "--max-new-tokens", "20") == 0
    printed = capsys.readouterr().out
    assert forced.lengths == [3]
    assert printed.startswith("Ada") and "<|end|>" not in printed


def test_export_and_generate_print_no_notice_or_progress_bar(exported, tmp_path):
    root, _, _ = exported
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    runs = [[sys.executable, str(repo / "tools" / "convert_checkpoint.py"), "export", "--load", str(root / "ckpt"),
             "--output", str(tmp_path / "hf")],
            [sys.executable, str(repo / "tools" / "generate.py"), "--load", str(root / "ckpt"), "--prompt", "Ada",
             "--max-new-tokens", "3"]]
    for cmd in runs:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        output = proc.stdout + proc.stderr
        assert "torch.distributed is disabled" not in output and "Loading weights" not in output, output
