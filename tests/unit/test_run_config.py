"""The typed run configuration: every flag reaches RunConfig or MoCConfig, it is frozen, and checkpoints
store the flags exactly as the namespace held them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moc_megatron import platform
from moc_megatron.checkpoint.model_config import MODEL_FLAGS, RUNTIME_FLAGS
from moc_megatron.config import MoCConfig
from moc_megatron.presets import PRESETS
from moc_megatron.training.arguments import build_parser, parse_args
from moc_megatron.training.config_from_args import (
    build_run_config,
    json_args,
    transformer_config_from_args,
)
from moc_megatron.training.finetune import parse_finetune_args, start_run
from moc_megatron.training.run_config import SECTIONS, RunConfig

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--vocab-size", "128",
        "--moc-memory-layers", "1", "3", "--moc-num-chapters", "9", "--moc-chapter-size", "4", "--moc-top-k", "2"]

# Flags that shape MoCConfig under another name, are folded into a derived field (blends, virtual stages),
# or only steer parsing: no field of their own.
NOT_A_FIELD = {"help", "preset", "norm_epsilon", "swiglu", "group_query_attention",
               "num_layers_per_virtual_pipeline_stage", "data_path", "train_data_path", "valid_data_path",
               "test_data_path"}


def same_name_fields() -> list[str]:
    """The flags whose argument name is the TransformerConfig field they set."""
    return [flag for flag, name in {**MODEL_FLAGS, **RUNTIME_FLAGS}.items() if flag == name]


def run_of(*extra: str, world_size: int = 1) -> tuple:
    args = parse_args([*BASE, *extra], world_size=world_size, exit_on_error=False)
    return args, build_run_config(args)


def test_every_flag_reaches_the_run_config():
    section_fields = {f.name for cls in [*SECTIONS.values(), RunConfig] for f in dataclasses.fields(cls)}
    model_fields = {f.name for f in dataclasses.fields(MoCConfig)}
    dests = {a.dest for a in build_parser()._actions}
    lost = sorted(dests - section_fields - model_fields - NOT_A_FIELD)
    assert not lost, f"flags that reach neither a RunConfig section nor MoCConfig: {lost}"
    assert not NOT_A_FIELD & (section_fields | model_fields), "NOT_A_FIELD lists a flag that has a field"


def test_sections_hold_the_validated_and_derived_values():
    args, run = run_of("--global-batch-size", "16", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "1", "--moc-memory-lr", "2e-3", world_size=4)
    assert (run.parallel.data_parallel_size, run.parallel.virtual_pipeline_model_parallel_size) == (2, 2)
    assert (run.schedule.num_microbatches, run.schedule.lr_decay_iters, run.schedule.lr_decay_iters_derived) == \
        (4, 10, True)
    assert run.optimizer.moc_memory_lr == 2e-3 and run.data.mock_data and run.data.data_blend is None
    assert run.seed == args.seed == run.model.moc_bank_seed
    for name, cls in SECTIONS.items():
        section = getattr(run, name)
        for f in dataclasses.fields(cls):
            assert getattr(section, f.name) == getattr(args, f.name, f.default), f"{name}.{f.name}"
    names = same_name_fields()
    assert {"num_layers", "hidden_size", "tensor_model_parallel_size", "recompute_method", "bf16"} <= set(names)
    for name in names:  # (an unset flag, None, leaves the field to TransformerConfig's own derivation)
        if getattr(args, name) is not None:
            assert getattr(run.model, name) == getattr(args, name), f"--{name} did not reach MoCConfig.{name}"
    want = transformer_config_from_args(args)
    assert (run.model.num_layers, run.model.moc_memory_layers, run.model.ffn_hidden_size) == \
        (want.num_layers, want.moc_memory_layers, want.ffn_hidden_size)


def test_the_flag_table_names_every_flag_that_sets_a_config_field():
    """The explicit flag -> TransformerConfig field table covers every flag named like a field (the platform
    decides CPU initialisation), and names only flags and fields that exist."""
    fields = {f.name for f in dataclasses.fields(MoCConfig) if not f.name.startswith("moc_")}
    dests = {a.dest for a in build_parser()._actions}
    table = {**MODEL_FLAGS, **RUNTIME_FLAGS}
    assert (dests & fields) - {"use_cpu_initialization"} == set(same_name_fields())
    assert set(table) <= dests and set(table.values()) <= fields


def test_run_config_is_frozen_and_replace_keeps_saved_args_in_step():
    args, run = run_of()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.schedule.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 3
    with pytest.raises(TypeError):
        run.saved_args["lr"] = 1.0
    assert list(run.saved_args.items()) == list(json_args(args).items()), "checkpoints store the flags"
    longer = run.replace("schedule", lr_decay_iters=20)
    assert longer.schedule.lr_decay_iters == 20 and longer.saved_args["lr_decay_iters"] == 20
    assert run.schedule.lr_decay_iters == 10 and run.saved_args["lr_decay_iters"] == 10, "the original is unchanged"
    assert list(longer.saved_args) == list(run.saved_args), "same keys, same order"


def test_finetune_run_config_and_start(tmp_path):
    pretrained = tmp_path / "pre"
    (pretrained / "iter_0000003").mkdir(parents=True)
    for name in ("metadata.json", "common.pt"):
        (pretrained / "iter_0000003" / name).write_text("")
    (pretrained / "latest_checkpointed_iteration.txt").write_text("3")
    argv = [a for a in BASE if a != "--mock-data"]
    args = parse_finetune_args([*argv, "--sft-data-path", str(tmp_path / "chat"), "--tokenizer-type",
                                "SentencePieceTokenizer", "--tokenizer-model", "m.model",
                                "--pretrained-checkpoint", str(pretrained)], world_size=1, exit_on_error=False)
    assert args.mock_data is False and args.data_blend is None
    run = build_run_config(args)
    assert run.data.sft_data_path == str(tmp_path / "chat") and not run.data.mock_data
    start, started = start_run(run)
    assert start == "pretrained"
    assert (started.checkpointing.load, started.checkpointing.finetune) == (str(pretrained), True)
    assert (started.saved_args["load"], started.saved_args["finetune"]) == (str(pretrained), True)
    assert run.checkpointing.load is None, "start_run returns a new configuration"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_typed_and_build_their_model(name):
    preset = PRESETS[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.backbone.num_layers = 1
    config = MoCConfig(**preset.config, use_cpu_initialization=True, **platform.transformer_config_overrides())
    assert config.num_layers == preset.backbone.num_layers
    assert config.has_memory == (preset.memory is not None)
    if preset.memory is not None:
        assert config.moc_memory_layers == list(preset.memory.moc_memory_layers)
    assert config.activation_func is torch.nn.functional.silu


def test_platform_owns_the_device_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MOC_FORCE_CPU", raising=False)
    assert platform.pin_memory() and not platform.weights_on_cpu(False) and platform.weights_on_cpu(True)
    monkeypatch.setenv("MOC_FORCE_CPU", "1")
    assert not platform.pin_memory() and platform.weights_on_cpu(False)
