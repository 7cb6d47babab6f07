"""Hugging Face export/import: logits equal the Megatron model's, cached generation equals full forwards,
padding does not change results, export -> import -> export is bit-exact, a dense Llama imports as a MoC
model with the same logits, and bad input is refused before anything is written."""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402  (tests/unit is on sys.path under pytest)

from moc_megatron.checkpoint import layout as meta  # noqa: E402
from moc_megatron.checkpoint.weights import save_weights_checkpoint  # noqa: E402
from moc_megatron.hf.export import ExportError, ExportOptions, export_checkpoint  # noqa: E402
from moc_megatron.hf.importer import (  # noqa: E402
    ImportError_,
    ImportOptions,
    import_checkpoint,
)
from moc_megatron.platform.megatron_versions import read_common_state  # noqa: E402

VARIANTS = {
    "sequence-paper-sharedbank-tied": [],
    "sequence-mixture-perlayer-untied": ["--moc-gating", "mixture", "--no-moc-shared-bank",
                                         "--untie-embeddings-and-output-weights"],
    "chunk-paper-sharedbank": ["--moc-routing-unit", "chunk"],
    "chunk-mixture-perlayer": ["--moc-routing-unit", "chunk", "--moc-gating", "mixture", "--no-moc-shared-bank"],
    "token-paper-2shared": ["--moc-routing-unit", "token", "--moc-num-shared-chapters", "2"],
    "token-mixture-untied": ["--moc-routing-unit", "token", "--moc-gating", "mixture",
                             "--untie-embeddings-and-output-weights"],
    "chunk-paper-0shared-perlayer": ["--moc-routing-unit", "chunk", "--moc-num-shared-chapters", "0",
                                     "--no-moc-shared-bank"],
}
quiet = lambda *a, **k: None  # noqa: E731


def load_hf(folder, impl="sdpa"):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                             attn_implementation=impl).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, mcore_world):
    """name -> (Megatron model, exported HF folder), for every variant."""
    out = {}
    for name, flags in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        model, args, config, settings = H.megatron_model(flags, seed=len(out))
        H.save_checkpoint(str(root / "ckpt"), model, args, config, settings)
        export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(root / "hf"), max_shard_size="40KB"),
                          log=quiet)
        out[name] = (model, str(root / "hf"), str(root))
    return out


def tokens(b=3, s=13, seed=1):
    return torch.randint(0, H.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_logits_equal_megatron_logits(exported, name, impl):
    model, folder, _ = exported[name]
    x = tokens()
    want = H.megatron_logits(model, x)
    hf = load_hf(folder, impl)
    with torch.no_grad():
        got = hf(x).logits
        assert (got - want).abs().max() <= 1e-4
        for layer in hf.model.layers:  # the memory matters: without it the logits differ
            if layer.has_memory:
                layer.memory.o_proj.weight.zero_()
        assert (hf(x).logits - want).abs().max() > 1e-2


def test_folder_layout_and_self_contained_model_files(exported):
    _, folder, _ = exported["sequence-mixture-perlayer-untied"]
    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "configuration_moc.py",
            "modeling_moc.py"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moc.MoCForCausalLM"
    assert config["tie_word_embeddings"] is False and config["shared_bank"] is False
    for name in ("configuration_moc.py", "modeling_moc.py"):
        tree = ast.parse(open(os.path.join(folder, name)).read())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert roots <= {"__future__", "torch", "transformers"}, (name, roots)


@pytest.mark.parametrize("name", ["chunk-paper-sharedbank", "chunk-mixture-perlayer", "token-paper-2shared"])
def test_greedy_generation_with_cache_equals_argmax_of_full_forwards(exported, name):
    hf = load_hf(exported[name][1])
    prompt = tokens(2, 6, seed=3)  # 6 + 9 new tokens cross several 4-token chunks
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                      pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(9):
            nxt = hf(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)


def test_sequence_routing_decodes_with_the_prompts_routing(exported):
    """With a cache, sequence routing keeps the chapters chosen on the prompt (documented in docs/hf.md)."""
    hf = load_hf(exported["sequence-paper-sharedbank-tied"][1])
    prompt = tokens(1, 8, seed=4)
    with torch.no_grad():
        first = hf(prompt, use_cache=True)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        nxt = first.logits[:, -1:].argmax(-1)
        step = hf(nxt, cache=cache, past_key_values=cache, use_cache=True).logits[:, -1]
        state = cache._moc_memory[0]
        routed_on_prompt = state["ids"].clone()
        full = hf(torch.cat([prompt, nxt], 1)).logits[:, -1]
        # the step's routing is the prompt's; the chapters projected once are kept on the cache
        assert torch.equal(cache._moc_memory[0]["ids"], routed_on_prompt)
        assert state["chapters"].ids is not None
    assert step.shape == full.shape


@pytest.mark.parametrize("name", ["sequence-paper-sharedbank-tied", "chunk-paper-sharedbank", "token-mixture-untied"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_sequence_at_a_time(exported, name, side):
    hf = load_hf(exported[name][1])
    lengths = [13, 7, 10]
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    s = max(lengths)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for i, q in enumerate(seqs):
        sl = slice(s - len(q), s) if side == "left" else slice(0, len(q))
        ids[i, sl], mask[i, sl] = q, 1
    with torch.no_grad():
        batch = hf(ids, attention_mask=mask).logits
        for i, q in enumerate(seqs):
            alone = hf(q[None]).logits[0]
            got = batch[i][mask[i].bool()]
            assert (got - alone).abs().max() <= 1e-4, i
    if side == "left":  # generation from a left-padded batch equals generating each prompt alone
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i, q in enumerate(seqs):
            alone = hf.generate(q[None], attention_mask=torch.ones(1, len(q), dtype=torch.long), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
            assert torch.equal(out[i, s:], alone[0, len(q):]), i


def _shards(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.endswith(".safetensors")}


@pytest.mark.parametrize("name", ["sequence-mixture-perlayer-untied", "token-paper-2shared",
                                  "chunk-paper-0shared-perlayer"])
def test_export_import_export_is_bit_exact(exported, name, tmp_path):
    model, folder, _ = exported[name]
    import_checkpoint(ImportOptions(hf=folder, save=str(tmp_path / "ckpt")), log=quiet)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "again"),
                                    max_shard_size="40KB"), log=quiet)
    assert _shards(folder) == _shards(str(tmp_path / "again"))


def test_imported_checkpoint_loads_in_pretrain_at_iteration_0(exported, tmp_path):
    """``pretrain_moc.py --load`` of an imported checkpoint starts at iteration 0 from its weights."""
    from moc_megatron.training.arguments import parse_run_config
    from moc_megatron.training.loop import pretrain

    _, folder, _ = exported["chunk-paper-sharedbank"]
    import_checkpoint(ImportOptions(hf=folder, save=str(tmp_path / "ckpt")), log=quiet)
    flags = [*H.BASE, "--moc-routing-unit", "chunk", "--load", str(tmp_path / "ckpt"), "--save",
             str(tmp_path / "ckpt"), "--train-iters", "1", "--global-batch-size", "1", "--eval-iters", "0",
             "--num-workers", "0", "--log-interval", "1", "--save-interval", "1"]
    pretrain(parse_run_config(flags, world_size=1, exit_on_error=False))
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read().strip() == "1"


def _tiny_llama(folder, tie: bool, **extra):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms too
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_dense_llama_import_keeps_its_logits(tmp_path, tie, mcore_world):
    llama = _tiny_llama(str(tmp_path / "llama"), tie)
    import_checkpoint(ImportOptions(hf=str(tmp_path / "llama"), save=str(tmp_path / "ckpt"), moc_flags=[
        "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--moc-routing-unit", "chunk", "--moc-chunk-size", "4"]), log=quiet)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "moc")), log=quiet)
    moc = load_hf(str(tmp_path / "moc"))
    assert moc.config.memory_layers == [1] and moc.config.vocab_size == 100  # the true vocabulary, not 128
    x = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llama(x).logits
        got = moc(x).logits
    assert (got - want).abs().max() <= 1e-4
    assert moc.model.layers[1].memory.o_proj.weight.abs().max() == 0  # new memory: W_O = 0
    assert moc.model.memory_bank.routed.abs().max() > 0


def test_llama_attention_bias_and_other_architectures_are_refused(tmp_path, mcore_world):
    _tiny_llama(str(tmp_path / "biased"), True, attention_bias=True)
    with pytest.raises(ImportError_, match="attention_bias=True"):
        import_checkpoint(ImportOptions(hf=str(tmp_path / "biased"), save=str(tmp_path / "a"),
                                        moc_flags=["--moc-memory-layers", "1", "--moc-num-chapters", "5"]), log=quiet)
    cfg = json.load(open(tmp_path / "biased" / "config.json"))
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    json.dump(cfg, open(tmp_path / "biased" / "config.json", "w"))
    with pytest.raises(ImportError_, match="unsupported architecture"):
        import_checkpoint(ImportOptions(hf=str(tmp_path / "biased"), save=str(tmp_path / "b"),
                                        moc_flags=["--moc-memory-layers", "1"]), log=quiet)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_bad_checkpoints_are_refused_before_any_output(exported, tmp_path):
    import shutil

    from moc_megatron.hf.dist_reader import CheckpointReadError

    _, folder, root = exported["chunk-paper-sharedbank"]
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(ExportOptions(load=os.path.join(root, "ckpt"), output=folder), log=quiet)
    broken = tmp_path / "ckpt"
    shutil.copytree(os.path.join(root, "ckpt"), broken)
    it = broken / "iter_0000000"
    shard = sorted(p for p in os.listdir(it) if p.endswith(".distcp"))[0]
    with open(it / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointReadError, match="truncated"):
        export_checkpoint(ExportOptions(load=str(broken), output=str(tmp_path / "out")), log=quiet)
    os.remove(it / shard)
    with pytest.raises(CheckpointReadError, match="missing"):
        export_checkpoint(ExportOptions(load=str(broken), output=str(tmp_path / "out")), log=quiet)
    # a checkpoint whose tensors are another model's shape than its signature says
    shutil.rmtree(broken)
    shutil.copytree(os.path.join(root, "ckpt"), broken)
    common = read_common_state(str(it))
    common["model_signature"]["ffn_hidden_size"] = 96
    torch.save(common, it / "common.pt")  # a common.pt is read first, whichever release saved the checkpoint
    with pytest.raises(ExportError, match="linear_fc1.weight: shape"):
        export_checkpoint(ExportOptions(load=str(broken), output=str(tmp_path / "out")), log=quiet)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / ".out.partial")


def test_tokenizer_of_another_vocabulary_is_refused(exported, tmp_path, sp_model):
    from moc_megatron.hf.hf_tokenizer import TokenizerError

    _, _, root = exported["chunk-paper-sharedbank"]
    with pytest.raises(TokenizerError, match="not the tokenizer"):
        export_checkpoint(ExportOptions(load=os.path.join(root, "ckpt"), output=str(tmp_path / "out"),
                                        tokenizer_model=sp_model), log=quiet)
    assert not os.path.exists(tmp_path / "out")


def test_sentencepiece_tokenizer_ships_as_tokenizer_json(tmp_path, sp_model, tiny_texts, mcore_world):
    from moc_megatron.data.tokenizer import SentencePieceTokenizer

    model, args, config, settings = H.megatron_model(["--vocab-size", "512"])
    H.save_checkpoint(str(tmp_path / "ckpt"), model, args, config, settings)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "hf"),
                                    tokenizer_model=sp_model), log=quiet)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    sp = SentencePieceTokenizer(sp_model)
    for text in ["Ada Lovelace was born in London in 1815.", *tiny_texts]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.tokenize(text), text
    assert tok.eos_token_id == sp.eod
    assert json.load(open(tmp_path / "hf" / "config.json"))["eos_token_id"] == sp.eod


def test_command_line_export_import_and_errors(exported, tmp_path, run_tool, capsys):
    _, folder, root = exported["token-paper-2shared"]
    assert run_tool("convert_checkpoint", "export", "--load", os.path.join(root, "ckpt"), "--output", folder) == 2
    assert "already exists" in capsys.readouterr().err
    llama = tmp_path / "llama"
    _tiny_llama(str(llama), True)
    assert run_tool("convert_checkpoint", "import", "--hf", llama, "--save", tmp_path / "ckpt",
                    "--moc-memory-layers", "0", "2", "--moc-num-chapters", "5", "--moc-top-k", "1",
                    "--no-moc-shared-bank") == 0
    assert run_tool("convert_checkpoint", "export", "--load", tmp_path / "ckpt", "--output", tmp_path / "hf",
                    "--dtype", "bf16", "--max-shard-size", "20KB") == 0
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["memory_layers"] == [0, 2] and config["shared_bank"] is False and config["dtype"] == "bfloat16"
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1


def test_checkpoint_tokenizer_record_is_checked_and_survives_the_round_trip(tmp_path, sp_model, mcore_world):
    """Export refuses a tokenizer other than the one the checkpoint records (same vocabulary size, other file);
    the record travels in the HF folder and an import writes it back into the Megatron checkpoint."""
    from dataclasses import replace

    from moc_megatron.data.tokenizer_record import record_for, record_from_checkpoint
    from moc_megatron.hf.hf_tokenizer import TokenizerError

    record = record_for("SentencePieceTokenizer", sp_model)
    model, args, config, settings = H.megatron_model(["--vocab-size", "512"])
    for name, rec in (("other", replace(record, model_sha256="0" * 64)), ("same", record)):
        path = tmp_path / name / "iter_0000000"
        os.makedirs(path)
        save_weights_checkpoint({"model": model.sharded_state_dict()}, config, settings, str(path), args.saved_args,
                                rec)
        meta.write_tracker(str(tmp_path / name), 0)
    with pytest.raises(TokenizerError, match="tokenizer mismatch.*model_sha256"):
        export_checkpoint(ExportOptions(load=str(tmp_path / "other"), output=str(tmp_path / "hf_other"),
                                        tokenizer_model=sp_model), log=quiet)
    assert not os.path.exists(tmp_path / "hf_other")
    export_checkpoint(ExportOptions(load=str(tmp_path / "same"), output=str(tmp_path / "hf"),
                                    tokenizer_model=sp_model), log=quiet)
    import_checkpoint(ImportOptions(hf=str(tmp_path / "hf"), save=str(tmp_path / "back")), log=quiet)
    assert record_from_checkpoint(str(tmp_path / "back" / "iter_0000000")) == record


def test_zero_shared_chapters_export_loads_with_every_weight(exported):
    """Without shared chapters the export still holds each bank's (empty) ``shared`` tensor: nothing missing."""
    _, folder, _ = exported["chunk-paper-0shared-perlayer"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    banks = [layer.memory.bank for layer in hf.model.layers if layer.has_memory]
    assert banks and all(b.shared.shape[0] == 0 and b.routed.shape[0] > 0 for b in banks)
