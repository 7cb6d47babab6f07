"""Memory added to the dense families people fine-tune from: each source model is built tiny and random by
transformers itself (no download), imported with a new memory layer, and then

- the Megatron model computes transformers' logits (<= 1e-4, fp32): the memory starts as the identity;
- the exported MoC folder computes them too (``modeling_moc.py`` has the family's features);
- export -> import -> export is bit-exact;
- the exported folder loads in plain transformers in a clean process (no project or megatron import).

What a family needs that the backbone cannot express is refused in one line naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from moc_megatron.hf.export import ExportOptions, export_checkpoint  # noqa: E402
from moc_megatron.hf.importer import ImportError_, ImportOptions, import_checkpoint  # noqa: E402

quiet = lambda *a, **k: None  # noqa: E731
SHAPE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# name -> (model class, config class, config fields); shapes differ between families on purpose.
FAMILIES = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig",
               dict(vocab_size=1000, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE, head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(vocab_size=1064, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1000000.0})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(vocab_size=777, tie_word_embeddings=False, head_dim=16)),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(vocab_size=1000, tie_word_embeddings=False, sliding_window=None, head_dim=12)),
    "smollm2": ("LlamaForCausalLM", "LlamaConfig",
                dict(vocab_size=1152, tie_word_embeddings=True, num_key_value_heads=3,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
}


def _source(name: str, folder: str):
    model_cls, config_cls, fields = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**SHAPE, **fields})
    return H.tiny_hf_model(getattr(transformers, model_cls), config, folder)


@pytest.fixture(scope="module")
def families(tmp_path_factory, mcore_world):
    """name -> (transformers model, imported checkpoint root, exported folder, tokens, transformers' logits)."""
    out = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(name)
        source = _source(name, str(root / "source"))
        import_checkpoint(ImportOptions(hf=str(root / "source"), save=str(root / "ckpt"), moc_flags=H.MEMORY_FLAGS),
                          log=quiet)
        export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(root / "moc")), log=quiet)
        x = torch.randint(0, source.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = source(x).logits
        out[name] = (source, str(root / "ckpt"), str(root / "moc"), x, want)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_imported_megatron_model_computes_the_source_logits(families, name):
    _, ckpt, _, x, want = families[name]
    got = H.megatron_logits(H.load_megatron_checkpoint(ckpt), x)[..., : want.shape[-1]]
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_moc_model_computes_the_source_logits_and_round_trips(families, name, tmp_path):
    source, _, folder, x, want = families[name]
    moc = H.load_hf(folder)
    assert moc.config.vocab_size == source.config.vocab_size
    with torch.no_grad():
        assert (moc(x).logits - want).abs().max() <= 1e-4
    import_checkpoint(ImportOptions(hf=folder, save=str(tmp_path / "ckpt")), log=quiet)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "again")), log=quiet)
    assert H.shard_bytes(folder) == H.shard_bytes(str(tmp_path / "again"))


def test_family_features_map_to_megatron_options_and_matter(families):
    """Each family's feature is in the export's config and the Megatron signature, and the logits depend on it
    (so the equality tests above would catch it missing)."""
    from moc_megatron.eval.models import saved_common_state

    configs = {name: json.load(open(os.path.join(folder, "config.json"))) for name, (_, _, folder, _, _) in
               families.items()}
    assert configs["qwen2"]["qkv_bias"] and not configs["qwen2"]["qk_norm"]
    assert configs["qwen3"]["qk_norm"] and not configs["qwen3"]["qkv_bias"]
    assert configs["llama3"]["rope_parameters"]["rope_type"] == "llama3"
    assert configs["smollm2"]["tie_word_embeddings"] and not configs["llama3"]["tie_word_embeddings"]
    signatures = {name: saved_common_state(os.path.join(ckpt, "iter_0000000"))["model_signature"]
                  for name, (_, ckpt, _, _, _) in families.items()}
    assert signatures["qwen2"]["add_qkv_bias"] and signatures["qwen3"]["qk_layernorm"]
    assert signatures["llama3"]["rope_scaling"] and signatures["llama3"]["rope_scaling_factor"] == 8.0
    changes = {
        "qwen2": lambda m: [layer.self_attn.k_proj.bias.zero_() for layer in m.model.layers],
        "qwen3": lambda m: [layer.self_attn.q_norm.weight.fill_(1.0) for layer in m.model.layers],
    }
    for name, change in changes.items():
        _, _, folder, x, want = families[name]
        moc = H.load_hf(folder)
        with torch.no_grad():
            change(moc)
            assert (moc(x).logits - want).abs().max() > 1e-3, name


def test_llama3_rope_frequencies_are_megatrons_and_transformers(families):
    """The scaled RoPE frequencies of the exported model equal megatron-core's and transformers' own, and differ
    from plain RoPE's (a tiny model's logits barely feel the low frequencies that llama3 scaling changes)."""
    from moc_megatron.hf.modeling_moc import _inv_freq

    source, ckpt, folder, _, _ = families["llama3"]
    rope = json.load(open(os.path.join(folder, "config.json")))["rope_parameters"]
    ours = _inv_freq(16, rope, torch.device("cpu"))
    megatron = H.load_megatron_checkpoint(ckpt).rotary_pos_emb.inv_freq
    assert torch.equal(ours, megatron.to(ours.dtype))
    assert torch.allclose(ours, source.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    plain = _inv_freq(16, {"rope_type": "default", "rope_theta": rope["rope_theta"]}, torch.device("cpu"))
    assert (plain / ours).max() > 7.9  # the lowest frequencies are divided by the factor 8


def test_exported_folders_load_in_plain_transformers_in_a_clean_process(families, tmp_path):
    """A fresh interpreter, started outside the repository, loads every exported folder with trust_remote_code
    and computes the source model's logits; neither this project nor megatron is imported."""
    cases = {}
    for name, (_, _, folder, x, want) in families.items():
        torch.save({"x": x, "want": want}, tmp_path / f"{name}.pt")
        cases[name] = [folder, str(tmp_path / f"{name}.pt")]
    script = (
        "import json, sys, torch, transformers\n"
        "worst = {}\n"
        "for name, (folder, case) in json.loads(sys.argv[1]).items():\n"
        "    m = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "    c = torch.load(case)\n"
        "    with torch.no_grad():\n"
        "        worst[name] = (m(c['x']).logits - c['want']).abs().max().item()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('moc_megatron', 'megatron')]\n"
        "print(json.dumps({'worst': worst, 'bad': bad}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["bad"] and set(result["worst"]) == set(FAMILIES)
    assert all(v <= 1e-4 for v in result["worst"].values()), result["worst"]


REFUSALS = [
    ("mistral", dict(sliding_window=16), r"sliding_window=16 < max_position_embeddings=64"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16), r"use_sliding_window=True"),
    ("llama3", dict(rope_parameters={**LLAMA3_ROPE, "low_freq_factor": 2.0}), r"rope_parameters.low_freq_factor=2.0"),
    ("llama3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
     r"rope_parameters.rope_type='yarn'"),
    ("llama3", dict(attention_bias=True), r"attention_bias=True"),
    ("qwen3", dict(attention_bias=True), r"attention_bias=True"),
    ("llama3", dict(mlp_bias=True), r"mlp_bias=True"),
    ("llama3", dict(hidden_act="gelu"), r"hidden_act='gelu'"),
]


@pytest.mark.parametrize("name,change,message", REFUSALS, ids=[m.split("=")[0].split(".")[-1] for _, _, m in REFUSALS])
def test_what_the_backbone_cannot_express_is_refused_naming_the_field(tmp_path, name, change, message, mcore_world):
    model_cls, config_cls, fields = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**SHAPE, **fields, "num_hidden_layers": 2})
    getattr(transformers, model_cls)(config).save_pretrained(str(tmp_path / "source"))
    cfg = json.load(open(tmp_path / "source" / "config.json"))
    cfg.update(change)
    json.dump(cfg, open(tmp_path / "source" / "config.json", "w"))
    with pytest.raises(ImportError_, match=message) as info:
        import_checkpoint(ImportOptions(hf=str(tmp_path / "source"), save=str(tmp_path / "ckpt"),
                                        moc_flags=H.MEMORY_FLAGS), log=quiet)
    assert "\n" not in str(info.value) and not os.path.exists(tmp_path / "ckpt")


def test_a_window_that_never_binds_is_accepted():
    from moc_megatron.hf.families import backbone_from_dense

    config = transformers.MistralConfig(**{**SHAPE, **FAMILIES["mistral"][2], "sliding_window": 64}).to_dict()
    assert backbone_from_dense(config)["max_position_embeddings"] == 64  # window 64 >= context 64: plain attention


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_imported_family_trains_with_the_printed_flags(tmp_path, name, mcore_world):
    """``pretrain_moc.py`` with the flags the import prints loads the checkpoint (signature with qk_layernorm /
    rope scaling) and trains from iteration 0."""
    from moc_megatron.training.arguments import parse_run_config
    from moc_megatron.training.loop import pretrain

    _source(name, str(tmp_path / "source"))
    lines = []
    import_checkpoint(ImportOptions(hf=str(tmp_path / "source"), save=str(tmp_path / "ckpt"),
                                    moc_flags=H.MEMORY_FLAGS), log=lines.append)
    flags = lines[-1].split("\n", 1)[1].split()
    flags = [*flags[: flags.index("--seq-length")], *flags[flags.index("--seq-length") + 2:]]
    result = pretrain(parse_run_config([*flags, "--seq-length", "16", "--mock-data", "--micro-batch-size", "1",
                                  "--train-iters", "1", "--lr", "1e-4", "--load", str(tmp_path / "ckpt"), "--save",
                                  str(tmp_path / "ckpt"), "--save-interval", "1", "--eval-iters", "0",
                                  "--num-workers", "0"], world_size=1, exit_on_error=False))
    assert sorted(result.lm_losses) == [1]
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read().strip() == "1"


# config.json files as transformers 4.x wrote them (``rope_scaling`` + top-level ``rope_theta``), with the fields
# this converter reads, shaped like the hub's Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B, SmolLM2-135M and Mistral-7B.
HUB_STYLE = {
    "llama-3.2": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                      intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                      tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False),
    "qwen2.5": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                    use_sliding_window=False, max_window_layers=21, tie_word_embeddings=True, hidden_act="silu"),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
                  rope_scaling=None, sliding_window=None, use_sliding_window=False, attention_bias=False,
                  tie_word_embeddings=True, hidden_act="silu"),
    "smollm2": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000, rope_scaling=None,
                    tie_word_embeddings=True, hidden_act="silu"),
    "mistral-v0.1": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                         sliding_window=4096, tie_word_embeddings=False, hidden_act="silu"),
}


def test_hub_style_configs_map_or_are_refused():
    from moc_megatron.hf.families import UnsupportedSourceError, backbone_from_dense
    from moc_megatron.hf.importer import ImportOptions, training_flags

    llama = backbone_from_dense(HUB_STYLE["llama-3.2"])
    assert llama["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}
    assert training_flags(llama, ImportOptions(hf="", save=""), llama["vocab_size"])[-3:] == [
        "--use-rope-scaling", "--rope-scaling-factor", "32.0"]
    qwen2 = backbone_from_dense(HUB_STYLE["qwen2.5"])
    assert qwen2["qkv_bias"] and qwen2["head_dim"] == 64 and qwen2["rope_parameters"]["rope_theta"] == 1e6
    qwen3 = backbone_from_dense(HUB_STYLE["qwen3"])
    assert qwen3["qk_norm"] and qwen3["head_dim"] == 128 and not qwen3["qkv_bias"]
    smol = backbone_from_dense(HUB_STYLE["smollm2"])
    assert smol["tie_word_embeddings"] and smol["num_key_value_heads"] == 3
    with pytest.raises(UnsupportedSourceError, match=r"sliding_window=4096 < max_position_embeddings=32768"):
        backbone_from_dense(HUB_STYLE["mistral-v0.1"])
