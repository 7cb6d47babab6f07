"""The model part of a run, stored in checkpoints as data; checkpoints that hold only their flags still load."""

from __future__ import annotations

import os

import hf_helpers as H  # tests/unit is on sys.path under pytest
import pytest
import torch
from test_arguments import BASE as FLAGS
from test_arguments import MEMORY_FLAGS as MEMORY

from moc_megatron.checkpoint import model_config as mc
from moc_megatron.checkpoint.signature import model_signature
from moc_megatron.platform.megatron_versions import read_common_state
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.config_from_args import run_model_settings


@pytest.mark.parametrize("extra", [
    [],
    [*MEMORY, "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--num-query-groups", "2",
     "--norm-epsilon", "1e-6", "--moc-routing-unit", "chunk", "--moc-chunk-size", "8", "--seed", "7"],
    [*MEMORY, "--untie-embeddings-and-output-weights", "--use-rope-scaling", "--qk-layernorm", "--add-qkv-bias",
     "--kv-channels", "32", "--no-moc-shared-bank", "--rotary-base", "50000"],
], ids=["dense", "swiglu-chunk", "untied-rope-scaling"])
def test_saved_flags_give_the_same_model_as_the_record(extra):
    """A checkpoint saved before the model record existed (flags + signature) rebuilds the same model."""
    run = parse_run_config([*FLAGS, *extra], world_size=1, exit_on_error=False)
    settings = run_model_settings(run)
    record = mc.model_record(run.model, settings)
    old = {"args": dict(run.saved_args), "model_signature": model_signature(run.model, settings)}
    from_flags = mc.model_record_from_flags(old["args"], old["model_signature"])
    config, rebuilt = mc.config_from_record(from_flags)
    assert rebuilt == settings
    assert mc.model_record(config, rebuilt) == record
    assert mc.model_record(*mc.config_from_record(mc.read_model_record(old, "old"))) == record
    new = {**old, mc.MODEL_CONFIG_KEY: record}
    assert mc.model_record(*mc.config_from_record(mc.read_model_record(new, "new"))) == record


def test_a_checkpoint_without_a_model_record_loads_from_its_flags(tmp_path, mcore_world):
    """The common state of a checkpoint saved before ``model_config`` existed: the model rebuilt from its
    flags computes what the saved one did."""
    model, run, config, settings = H.megatron_model([])
    root = H.save_checkpoint(str(tmp_path / "ckpt"), model, run, config, settings)
    path = os.path.join(root, "iter_0000000")
    common = read_common_state(path)
    assert common[mc.MODEL_CONFIG_KEY] == mc.model_record(config, settings)
    del common[mc.MODEL_CONFIG_KEY]
    torch.save(common, os.path.join(path, "common.pt"))  # a common.pt is read first, whichever release saved it
    assert mc.MODEL_CONFIG_KEY not in read_common_state(path)
    tokens = torch.randint(0, H.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H.megatron_logits(H.load_megatron_checkpoint(root), tokens),
                               H.megatron_logits(model, tokens), rtol=0, atol=0)
