"""What a resume loads, decided by ``plan_load`` from a checkpoint's common state alone (no process group)."""

from __future__ import annotations

import pytest

from moc_megatron.checkpoint.metadata import optimizer_metadata
from moc_megatron.checkpoint.signature import model_signature
from moc_megatron.training import checkpointing
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.checkpointing import CheckpointMismatchError, plan_load
from moc_megatron.training.config_from_args import run_model_settings

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
         "--vocab-size", "64", "--mock-data", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
         "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2"]
LAYOUT = dict(tp=1, pp=1, dp=1, ep=1, vpp=None)
PATH = "ckpt/iter_0000008"


def run_of(*extra: str):
    return parse_run_config([*FLAGS, *extra], world_size=1, exit_on_error=False)


def signature_of(run) -> dict:
    return model_signature(run.model, run_model_settings(run))


def common_of(run, layout: dict = LAYOUT, distributed: bool = False, sharding: str = "dp_reshardable") -> dict:
    """The common state a run of ``run``'s model saved at iteration 8 (32 samples)."""
    metadata = optimizer_metadata(distributed, sharding == "fully_reshardable")
    return dict(model_signature=signature_of(run), train_state={"consumed_train_samples": 32},
                parallel_layout=dict(layout), optimizer_metadata=metadata, saved_optimizer=True, saved_rng=True)


def plan(run, common: dict, layout: dict = LAYOUT, signature: dict | None = None):
    return plan_load(run, PATH, 8, common, layout, signature or signature_of(run))


class _NoProcessGroup:
    def __getattr__(self, name: str):
        raise AssertionError(f"plan_load touched torch.distributed/parallel_state ({name})")


def test_plans_need_no_process_group(monkeypatch):
    monkeypatch.setattr(checkpointing, "dist", _NoProcessGroup())
    monkeypatch.setattr(checkpointing, "parallel_state", _NoProcessGroup())
    run = run_of()
    p = plan(run, common_of(run))
    assert (p.iteration, p.consumed_train_samples, p.load_optimizer, p.load_rng) == (8, 32, True, True)
    assert p.notes == () and not p.weights_only and p.optimizer_metadata == {"chained_optim_avoid_prefix": True}
    assert "loaded checkpoint ckpt/iter_0000008 at iteration 8" in p.loaded_note


def test_finetune_loads_the_weights_only_and_starts_at_zero():
    run = run_of("--finetune")
    p = plan(run, common_of(run))
    assert (p.iteration, p.consumed_train_samples, p.saved_consumed_train_samples) == (0, 0, 32)
    assert p.weights_only and not p.load_optimizer and not p.load_rng and p.optimizer_metadata is None
    assert "--finetune" in p.loaded_note


def test_skipped_parts_and_rng_at_another_layout():
    run = run_of("--no-load-optim", "--no-load-rng")
    p = plan(run, common_of(run))
    assert (p.iteration, p.load_optimizer, p.load_rng, p.notes) == (8, False, False, ())
    run = run_of()
    other = dict(LAYOUT, dp=2)
    p = plan(run, common_of(run, other))
    assert p.load_optimizer and not p.load_rng
    assert len(p.notes) == 1 and "RNG states not restored" in p.notes[0]


def test_another_model_is_refused_naming_the_flag():
    run = run_of()
    common = common_of(run)
    common["model_signature"]["moc_top_k"] = 3
    with pytest.raises(CheckpointMismatchError, match=r"--moc-top-k \(moc_top_k\): checkpoint 3, this run 2"):
        plan(run, common)


def test_optimizer_state_that_cannot_load_here_is_refused():
    run = run_of()
    with pytest.raises(CheckpointMismatchError, match="--use-distributed-optimizer"):
        plan(run, common_of(run, distributed=True))
    run = run_of("--use-distributed-optimizer")
    saved_at = dict(LAYOUT, tp=2)
    with pytest.raises(CheckpointMismatchError, match="dp_reshardable"):
        plan(run, common_of(run, saved_at, distributed=True))
    p = plan(run, common_of(run, saved_at, distributed=True, sharding="fully_reshardable"))
    assert p.load_optimizer and p.optimizer_metadata["distrib_optim_sharding_type"] == "fully_reshardable"
    p = plan(run_of("--use-distributed-optimizer", "--no-load-optim"), common_of(run, saved_at, distributed=True))
    assert not p.load_optimizer, "--no-load-optim resumes from another layout with a fresh optimizer"
