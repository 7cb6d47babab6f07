"""Exports carry the true vocabulary: Megatron's padding rows (``--make-vocab-size-divisible-by``) are dropped on
export and added back (zero) on import; logits agree over the true vocabulary; an unknown vocabulary is refused
unless ``--keep-padded-vocab`` asks for the padded rows."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_helpers as H  # noqa: E402

from moc_megatron.hf.export import ExportError, ExportOptions, export_checkpoint  # noqa: E402
from moc_megatron.hf.hf_tokenizer import TokenizerError  # noqa: E402
from moc_megatron.hf.importer import ImportOptions, import_checkpoint  # noqa: E402

quiet = lambda *a, **k: None  # noqa: E731


def _shards(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.endswith(".safetensors")}


@pytest.mark.parametrize("vocab,untied", [(1000, True), (1064, False)])
def test_export_drops_padding_rows_and_keeps_logits(tmp_path, mcore_world, vocab, untied):
    flags = ["--vocab-size", str(vocab), *(["--untie-embeddings-and-output-weights"] if untied else [])]
    model, args, config, settings = H.megatron_model(flags)
    assert settings.vocab_size % 128 == 0 and settings.vocab_size > vocab
    H.save_checkpoint(str(tmp_path / "ckpt"), model, args, config, settings)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "hf")), log=quiet)
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == vocab
    hf = H.load_hf(str(tmp_path / "hf"))
    assert hf.model.embed_tokens.weight.shape[0] == vocab and hf.lm_head.weight.shape[0] == vocab
    x = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = hf(x).logits, H.megatron_logits(model, x)
    assert got.shape[-1] == vocab and (got - want[..., :vocab]).abs().max() <= 1e-4
    # import pads again for training (zero rows); export -> import -> export is bit-exact
    import_checkpoint(ImportOptions(hf=str(tmp_path / "hf"), save=str(tmp_path / "back")), log=quiet)
    from moc_megatron.hf.dist_reader import DistCheckpointReader

    back = DistCheckpointReader(str(tmp_path / "back" / "iter_0000000"))
    emb = back.load("embedding.word_embeddings.weight")
    assert emb.shape[0] == settings.vocab_size and emb[vocab:].abs().max() == 0
    export_checkpoint(ExportOptions(load=str(tmp_path / "back"), output=str(tmp_path / "again")), log=quiet)
    assert _shards(str(tmp_path / "hf")) == _shards(str(tmp_path / "again"))


def test_unknown_vocabulary_is_refused_unless_keep_padded_vocab(tmp_path, mcore_world):
    model, args, config, settings = H.megatron_model(["--vocab-size", "1000"])
    args = args.replace("data", vocab_size=None)  # a checkpoint that records neither a tokenizer nor --vocab-size
    H.save_checkpoint(str(tmp_path / "ckpt"), model, args, config, settings)
    with pytest.raises(ExportError, match="true vocabulary is unknown.*--keep-padded-vocab"):
        export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "hf")), log=quiet)
    assert not os.path.exists(tmp_path / "hf")
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "hf"),
                                    keep_padded_vocab=True), log=quiet)
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == 1024
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "given"), vocab_size=1000),
                      log=quiet)
    assert json.load(open(tmp_path / "given" / "config.json"))["vocab_size"] == 1000
    with pytest.raises(TokenizerError, match=r"vocabulary 2000 \(--vocab-size\) pads to 2048"):
        export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "x"), vocab_size=2000),
                          log=quiet)


def test_command_line_keep_padded_vocab(tmp_path, mcore_world, run_tool, capsys):
    model, args, config, settings = H.megatron_model(["--vocab-size", "1000"])
    args = args.replace("data", vocab_size=None)
    H.save_checkpoint(str(tmp_path / "ckpt"), model, args, config, settings)
    assert run_tool("convert_checkpoint", "export", "--load", tmp_path / "ckpt", "--output", tmp_path / "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "true vocabulary is unknown" in err
    assert run_tool("convert_checkpoint", "export", "--load", tmp_path / "ckpt", "--output", tmp_path / "hf",
                    "--keep-padded-vocab") == 0


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_dense_llama_with_odd_vocabulary_round_trips(tmp_path, mcore_world, vocab):
    """The issue's case: GQA 6/2, untied, RoPE base 50000, an odd vocabulary: import adds memory, export gives the
    same vocabulary and the original model's logits."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=50000.0)
    llama = H.tiny_hf_model(transformers.LlamaForCausalLM, cfg, str(tmp_path / "llama"))
    import_checkpoint(ImportOptions(hf=str(tmp_path / "llama"), save=str(tmp_path / "ckpt"),
                                    moc_flags=H.MEMORY_FLAGS), log=quiet)
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "moc")), log=quiet)
    moc = H.load_hf(str(tmp_path / "moc"))
    assert moc.config.vocab_size == vocab
    x = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moc(x).logits - llama(x).logits).abs().max() <= 1e-4


def test_dense_model_with_more_rows_than_its_tokenizer_imports_the_tokenizers_vocabulary(tmp_path, mcore_world,
                                                                                        hf_tokenizer_dir):
    """Qwen2.5's case (151665 tokens, 151936 embedding rows), small: a Qwen2 model with 1064 rows and a 600-token
    tokenizer.json imports with Megatron's padding of the tokenizer (640 rows) and exports 600 tokens with the
    source's logits over them."""
    import shutil

    cfg = transformers.Qwen2Config(vocab_size=1064, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    source = H.tiny_hf_model(transformers.Qwen2ForCausalLM, cfg, str(tmp_path / "qwen"))
    for name in os.listdir(hf_tokenizer_dir):
        shutil.copy(os.path.join(hf_tokenizer_dir, name), tmp_path / "qwen" / name)
    import_checkpoint(ImportOptions(hf=str(tmp_path / "qwen"), save=str(tmp_path / "ckpt"),
                                    moc_flags=H.MEMORY_FLAGS), log=quiet)
    assert H.load_megatron_checkpoint(str(tmp_path / "ckpt")).embedding.word_embeddings.weight.shape[0] == 640
    export_checkpoint(ExportOptions(load=str(tmp_path / "ckpt"), output=str(tmp_path / "moc")), log=quiet)
    moc = H.load_hf(str(tmp_path / "moc"))
    assert moc.config.vocab_size == 600
    x = torch.randint(0, 600, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moc(x).logits - source(x).logits[..., :600]).abs().max() <= 1e-4
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "moc"), trust_remote_code=True)) == 600
