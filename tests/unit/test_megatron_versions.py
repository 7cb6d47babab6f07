"""Each megatron-core release difference in moc_megatron/platform/megatron_versions.py, on the installed release.

The behaviour keyed to a release is checked on both sides of the key where it can be without that release
installed (the version is a module constant); CI runs this file on megatron-core 0.16.1 and on the newest.
"""

from __future__ import annotations

import logging
import os
import types
import warnings

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from packaging.version import Version

from moc_megatron.platform import megatron_versions as mv


def test_release_keys_and_the_supported_range(monkeypatch):
    assert mv.since("0.18", "0.19.2") and mv.since("0.19", "0.19.0rc1") and not mv.since("0.19", "0.18.0")
    assert mv.is_supported("0.16.1") and mv.is_supported("0.19.2") and mv.is_supported("0.19.9")
    assert not mv.is_supported("0.16.0") and not mv.is_supported("0.20.0")
    assert mv.is_supported(), f"the installed megatron-core {mv.MEGATRON_CORE_VERSION} is outside {mv.SUPPORTED_RANGE}"
    monkeypatch.setattr(mv, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"supports >=0.16.1,<0.20"):
        assert not mv.check_supported("0.21.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not mv.check_supported("0.21.0")  # once per process


def test_aux_loss_tracker_is_read_reset_and_forgotten_on_the_installed_release():
    mv.forget_aux_losses(["moc_test_loss"])
    mv.record_aux_loss("moc_test_loss", torch.tensor(2.0), layer_number=3, num_layers=4)
    mv.record_aux_loss("moc_test_loss", torch.tensor(0.5), layer_number=3, num_layers=4)
    values = mv.aux_loss_values("moc_test_loss")
    assert values is not None and values.tolist() == [0.0, 0.0, 2.5, 0.0]
    values.zero_()  # the live tensor: zeroing it resets the entry
    assert mv.aux_loss_values("moc_test_loss").tolist() == [0.0] * 4
    mv.forget_aux_losses(["moc_test_loss"])
    assert mv.aux_loss_values("moc_test_loss") is None
    # A later model with fewer layers records into a fresh entry (0.19 with a popped copy: IndexError).
    mv.record_aux_loss("moc_test_loss", torch.tensor(1.0), layer_number=2, num_layers=2)
    assert mv.aux_loss_values("moc_test_loss").tolist() == [0.0, 1.0]
    mv.forget_aux_losses(["moc_test_loss"])


def test_mlp_slot_is_built_without_rewrapping(mcore_world, caplog):
    from megatron.core.transformer.mlp import MLP

    from moc_megatron import platform
    from moc_megatron.config import MoCConfig
    from moc_megatron.model.layer_specs import local_layer_spec

    spec = local_layer_spec()
    config = MoCConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                       use_cpu_initialization=True, **platform.transformer_config_overrides())
    with caplog.at_level(logging.WARNING):
        layer = spec.module(config=config, submodules=spec.submodules, layer_number=1)
    assert isinstance(layer.mlp, MLP)
    assert layer.mlp.linear_fc1.weight.shape == (32, 16)
    assert not [r for r in caplog.records if "Rewrapping" in r.getMessage()]


def test_internal_notices_are_dropped_and_nothing_else(caplog):
    mv.quiet_internal_notices()
    mv.quiet_internal_notices()
    for logger_name, prefix in mv.INTERNAL_NOTICES:
        logger = logging.getLogger(logger_name)
        assert sum(isinstance(f, mv._DropNotice) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=logger_name):
            logger.warning(prefix + " and more")
            logger.warning("another warning")
        assert [r.getMessage() for r in caplog.records if r.name == logger_name] == ["another warning"]
        caplog.clear()


def test_default_cuda_graph_scope_is_emptied_without_the_full_scope_warning():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moc_megatron.config import MoCConfig

    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    defaults = TransformerConfig.__dataclass_fields__
    name = next(n for n in mv.CUDA_GRAPH_SCOPE_FIELDS if n in defaults and defaults[n].default == "full")
    with pytest.warns(UserWarning, match="full scope is deprecated"):
        plain = TransformerConfig(**shape)  # megatron-core's own default, as it warns about it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = MoCConfig(**shape)
    assert [str(w.message) for w in caught] == []
    assert getattr(config, name) == getattr(plain, name) == []
    chosen, full = types.SimpleNamespace(**{name: ["attn"]}), types.SimpleNamespace(**{name: "full"})
    mv.empty_full_cuda_graph_scope(chosen)
    mv.empty_full_cuda_graph_scope(full)
    assert getattr(chosen, name) == ["attn"] and getattr(full, name) == []


def _save(path, common: dict, as_release: str) -> None:
    """A dist checkpoint with one sharded tensor and ``common``, in the layout ``as_release`` writes."""
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0).view(2, 3)), **common}
    distcp_layout = mv.since(mv.COMMON_STATE_IN_DISTCP, as_release)
    if distcp_layout and not mv.since(mv.COMMON_STATE_IN_DISTCP):
        # What 0.19's save adds, written by an older release; its common.pt then removed.
        state["common_state"] = ShardedObject("common_state", dict(common), (1,), (0,), replica_id=0)
    os.makedirs(path)
    dist_checkpointing.save(state, str(path))
    legacy = os.path.join(path, mv.COMMON_STATE_FILE)
    if distcp_layout and os.path.exists(legacy):
        os.remove(legacy)
    if not distcp_layout and not os.path.exists(legacy):
        torch.save(dict(common), legacy)  # what releases before 0.19 write


@pytest.mark.parametrize("as_release", ["0.16.1", "0.19.2"])
def test_common_state_reads_in_the_layout_of_either_release(mcore_world, tmp_path, as_release):
    common = {"iteration": 7, "args": {"hidden_size": 32}, "model_signature": {"vocab_size": 128}}
    path = tmp_path / f"iter_{as_release}"
    _save(path, common, as_release)
    assert mv.since(mv.COMMON_STATE_IN_DISTCP, as_release) != os.path.exists(path / mv.COMMON_STATE_FILE)
    assert mv.is_complete_checkpoint(str(path))
    assert mv.read_common_state(str(path)) == common
    mv.adapt_common_state_loading()
    assert dist_checkpointing.load_common_state_dict(str(path)) == common
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 3))}, str(path))
    assert loaded["iteration"] == 7 and torch.equal(loaded["w"], torch.arange(6.0).view(2, 3))
    os.remove(path / "metadata.json")
    assert not mv.is_complete_checkpoint(str(path))


def test_a_folder_without_common_state_is_refused(tmp_path):
    (tmp_path / "metadata.json").write_text("{}")
    assert not mv.is_complete_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither common.pt nor"):
        mv.read_common_state(str(tmp_path))


class _Optimizer:
    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups


def _groups(max_lr: float, bank_lr: float) -> list[dict]:
    return [dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=False, is_decoupled_lr=False, max_lr=max_lr,
                 min_lr=0.0, params=[0]),
            dict(wd_mult=1.0, lr_mult=1.0, is_expert_parallel=True, is_decoupled_lr=False, max_lr=bank_lr,
                 min_lr=0.0, params=[1])]


@pytest.mark.parametrize("installed", ["0.16.1", "0.19.2"])
def test_saved_param_groups_take_the_runs_schedule_values(monkeypatch, installed):
    monkeypatch.setattr(mv, "MEGATRON_CORE_VERSION", Version(installed))
    run = _Optimizer(_groups(2e-3, 4e-3))
    saved = {"optimizer": {"param_groups": _groups(1e-3, 3e-3)}}
    changed = mv.align_saved_param_groups(run, saved)
    if installed == "0.16.1":  # groups were matched by their structural keys only: nothing to do
        assert changed == 0 and [g["max_lr"] for g in saved["optimizer"]["param_groups"]] == [1e-3, 3e-3]
        return
    assert changed == 2
    assert [g["max_lr"] for g in saved["optimizer"]["param_groups"]] == [2e-3, 4e-3]
    assert [g["max_lr"] for g in run.param_groups] == [2e-3, 4e-3]
    saved = {"optimizer": {"param_groups": _groups(1e-3, 3e-3)}}
    assert mv.align_saved_param_groups(run, saved, keep_checkpoint_values=True) == 2
    assert [g["max_lr"] for g in run.param_groups] == [1e-3, 3e-3]
