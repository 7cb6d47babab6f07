"""pretrain_moc.py's command line: flags vs MoCConfig, presets, validation, derived configurations."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
import torch.nn.functional as F

from moc_megatron.config import MoCConfig
from moc_megatron.config_flags import field_docstrings, flag_name, moc_fields
from moc_megatron.presets import get_preset
from moc_megatron.training.arguments import build_parser, parse_args
from moc_megatron.training.config_from_args import (
    build_run_config,
    optimizer_config,
    run_model_settings,
    transformer_config_from_args,
)
from moc_megatron.training.optimizer import BACKBONE, BANK, MEMORY, lr_overrides, param_role, role_lrs
from moc_megatron.training.validate_args import ArgumentsError, parse_blend

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "128"]
MEMORY_FLAGS = ["--moc-memory-layers", "1", "3", "--moc-num-chapters", "9", "--moc-chapter-size", "4",
                "--moc-top-k", "2"]


def parse(*extra: str, world_size: int = 1) -> argparse.Namespace:
    return parse_args([*BASE, *extra], world_size=world_size, exit_on_error=False)


def actions_by_dest() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions}


def test_every_moc_field_has_a_flag_with_its_docstring():
    actions = actions_by_dest()
    docs = field_docstrings(MoCConfig)
    fields = moc_fields()
    assert len(fields) >= 17
    for f in fields:
        assert f.name in actions, f"MoCConfig.{f.name} has no command-line flag"
        action = actions[f.name]
        assert flag_name(f.name) in action.option_strings
        assert docs[f.name] and docs[f.name] in action.help


def test_moc_flag_types_follow_annotations():
    args = parse(*MEMORY_FLAGS, "--moc-routing-unit", "chunk", "--moc-chunk-size", "8", "--no-moc-shared-bank",
                 "--moc-routed-scaling-factor", "1.5")
    assert args.moc_memory_layers == [1, 3]
    assert args.moc_num_chapters == 9 and isinstance(args.moc_num_chapters, int)
    assert args.moc_routing_unit == "chunk" and args.moc_shared_bank is False
    assert args.moc_routed_scaling_factor == 1.5
    with pytest.raises(SystemExit):
        parse(*MEMORY_FLAGS, "--moc-gating", "nonsense")


def test_megatron_flags_map_to_config_fields():
    """Every model flag lands in the MoCConfig field of the same (or Megatron-LM's) name."""
    args = parse(*MEMORY_FLAGS, "--num-query-groups", "2", "--ffn-hidden-size", "96", "--normalization", "RMSNorm",
                 "--disable-bias-linear", "--swiglu", "--norm-epsilon", "1e-6", "--hidden-dropout", "0.0",
                 "--attention-dropout", "0.0", "--init-method-std", "0.01", "--seed", "7", "--bf16")
    config = transformer_config_from_args(args)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (4, 64, 4)
    assert (config.num_query_groups, config.ffn_hidden_size, config.normalization) == (2, 96, "RMSNorm")
    assert config.add_bias_linear is False and config.layernorm_epsilon == 1e-6
    assert config.gated_linear_unit and config.activation_func is F.silu
    assert config.init_method_std == 0.01 and config.hidden_dropout == 0.0
    assert config.moc_memory_layers == [1, 3] and config.moc_top_k == 2
    assert config.moc_bank_seed == 7, "the bank is seeded from --seed unless --moc-bank-seed is given"
    assert config.bf16 and args.accumulate_allreduce_grads_in_fp32
    assert config.hetereogenous_dist_checkpoint, "memory layers are checkpointed per layer"
    names = {f.name for f in dataclasses.fields(MoCConfig)}
    assert {"num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups"} <= names
    opt = optimizer_config(build_run_config(args))
    assert opt.lr == 1e-3 and opt.bf16 and opt.clip_grad == 1.0 and opt.adam_beta2 == 0.999


def test_preset_supplies_defaults_and_flags_override():
    args = parse_args(["--preset", "moc-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "5",
                       "--lr", "1e-3"], world_size=1, exit_on_error=False)
    tiny = get_preset("moc-tiny")
    assert args.num_layers == tiny.config["num_layers"] and args.hidden_size == tiny.config["hidden_size"]
    assert args.moc_memory_layers == tiny.config["moc_memory_layers"]
    assert args.vocab_size == tiny.vocab_size and args.seq_length == tiny.seq_length
    assert args.swiglu and args.add_bias_linear is False
    assert transformer_config_from_args(args).activation_func is F.silu, "the presets' gated MLP is SwiGLU"

    args = parse_args(["--preset", "moc-tiny", "--mock-data", "--micro-batch-size", "2", "--train-iters", "5",
                       "--lr", "1e-3", "--hidden-size", "64", "--moc-top-k", "2", "--seq-length", "64"],
                      world_size=1, exit_on_error=False)
    assert args.hidden_size == 64 and args.moc_top_k == 2 and args.seq_length == 64
    assert args.num_layers == tiny.config["num_layers"]


def test_paper_preset_is_table_5():
    args = parse_args(["--preset", "moc-paper", "--mock-data", "--micro-batch-size", "1", "--train-iters", "1",
                       "--lr", "3e-4"], world_size=1, exit_on_error=False)
    config = transformer_config_from_args(args)
    shape = (config.num_layers, config.hidden_size, config.num_query_groups, config.ffn_hidden_size)
    assert shape == (16, 768, 4, 2304)
    assert config.moc_memory_layers == [2, 6, 10, 14] and config.moc_num_chapters == 4097
    assert run_model_settings(build_run_config(args)).vocab_size == 49152 and \
        run_model_settings(build_run_config(args)).rotary_base == 100000


def test_derived_parallel_and_batch_values():
    args = parse("--global-batch-size", "16", "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1", world_size=4)
    assert args.data_parallel_size == 2 and args.num_microbatches == 4
    assert args.virtual_pipeline_model_parallel_size == 2
    assert parse(world_size=2).global_batch_size == 4, "default global batch = micro batch x DP"
    assert parse().lr_decay_iters == 10


def test_vocab_is_padded_like_megatron():
    args = parse("--tensor-model-parallel-size", "2", world_size=2)
    assert run_model_settings(build_run_config(args), tokenizer_vocab_size=300).vocab_size == 512


@pytest.mark.parametrize("extra, world, message", [
    (["--global-batch-size", "6"], 2, "not divisible by --micro-batch-size"),
    (["--tensor-model-parallel-size", "3"], 4, "not divisible by tensor-model-parallel-size"),
    (["--num-layers-per-virtual-pipeline-stage", "1", "--virtual-pipeline-model-parallel-size", "2",
      "--pipeline-model-parallel-size", "2"], 2, "not both"),
    (["--virtual-pipeline-model-parallel-size", "2"], 1, "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
      "--global-batch-size", "3", "--micro-batch-size", "1"], 2, "multiple of --pipeline-model-parallel-size"),
    (["--lr-decay-style", "WSD"], 1, "needs --lr-wsd-decay-iters"),
    (["--min-lr", "1e-2"], 1, "--min-lr"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters"),
    (["--moc-bank-lr", "1e-3"], 1, "need a memory"),
    ([*MEMORY_FLAGS, "--moc-freeze-bank", "--moc-bank-lr", "1e-3"], 1, "--moc-freeze-bank"),
    ([*MEMORY_FLAGS[:-1], "9"], 1, "moc_top_k"),
    (["--moc-memory-layers", "7", "--moc-num-chapters", "9"], 1, "outside"),
    (["--data-path", "a_text_document"], 1, "exactly one data source"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--recompute-granularity", "full"], 1, "--recompute-method"),
    (["--expert-model-parallel-size", "2"], 1, "expert-model-parallel-size"),
])
def test_bad_combinations_fail_with_a_clear_message(extra, world, message):
    with pytest.raises(ArgumentsError, match=re.escape(message)):
        parse(*extra, world_size=world)


def test_missing_required_flags_are_named():
    with pytest.raises(ArgumentsError, match="--num-layers.*required"):
        parse_args(["--mock-data", "--vocab-size", "8"], world_size=1, exit_on_error=False)


def test_cli_error_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([*BASE, "--global-batch-size", "3"], world_size=1)
    assert exc.value.code == 2
    assert "--global-batch-size 3 is not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--no-such-flag"], world_size=1)


def test_real_data_needs_a_tokenizer_and_blends_parse():
    base = [a for a in BASE if a not in ("--mock-data",)]
    with pytest.raises(ArgumentsError, match="--tokenizer-type"):
        parse_args([*base, "--data-path", "x"], world_size=1, exit_on_error=False)
    args = parse_args([*base, "--data-path", "0.7", "a", "0.3", "b", "--tokenizer-type", "SentencePieceTokenizer",
                       "--tokenizer-model", "m.model"], world_size=1, exit_on_error=False)
    assert args.data_blend == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["a", "b"], "--data-path") == (["a", "b"], None)
    with pytest.raises(ArgumentsError, match="pairs"):
        parse_blend(["0.5", "a", "0.5"], "--data-path")
    with pytest.raises(ArgumentsError, match="not a mix"):
        parse_blend(["a", "0.5"], "--data-path")


def test_param_roles_and_learning_rates():
    assert param_role("module.module.memory_bank.routed") == BANK
    assert param_role("module.decoder.layers.1.cross_attention.own_bank.shared") == BANK
    assert param_role("module.decoder.layers.1.cross_attention.router.weight") == MEMORY
    assert param_role("decoder.layers.1.pre_cross_attn_layernorm.weight") == MEMORY
    assert param_role("decoder.layers.1.self_attention.linear_qkv.weight") == BACKBONE
    assert param_role("embedding.word_embeddings.weight") == BACKBONE
    lrs = role_lrs(3e-4, 3e-5, 6e-4, None)
    assert lrs == {BACKBONE: (3e-4, 3e-5), MEMORY: (6e-4, pytest.approx(6e-5)), BANK: (3e-4, pytest.approx(3e-5))}
    overrides = list(lr_overrides(3e-4, 3e-5, 6e-4, 5e-6).values())
    assert [o["max_lr"] for o in overrides] == [6e-4, 5e-6]
    assert overrides[1]["min_lr"] == pytest.approx(5e-7) and overrides[0]["lr_mult"] == pytest.approx(2.0)
    assert lr_overrides(3e-4, 0.0, None, None) == {}
