"""Optimizer param groups: separate backbone / memory / bank learning rates, and the frozen bank."""

from __future__ import annotations

import pytest
import torch
from megatron.core.utils import unwrap_model

from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.config_from_args import run_model_settings
from moc_megatron.training.data import build_datasets, data_iterators, dataset_tokenizer
from moc_megatron.training.logging import reset_memory_statistics
from moc_megatron.training.optimizer import BACKBONE, BANK, MEMORY, param_group_summary, param_role
from moc_megatron.training.setup import build_training_stack, initialize
from moc_megatron.training.train_step import train_step


def make_stack(*extra: str):
    run = parse_run_config([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
        "--vocab-size", "64", "--mock-data", "--micro-batch-size", "2", "--train-iters", "4", "--lr", "1e-3",
        "--min-lr", "1e-4", "--lr-decay-style", "linear", "--moc-memory-layers", "0", "--moc-num-chapters", "5",
        "--moc-chapter-size", "4", "--moc-top-k", "2", "--num-workers", "0", "--eval-iters", "0", *extra,
    ], world_size=1, exit_on_error=False)
    initialize(run)
    stack = build_training_stack(run, run.model, run_model_settings(run))
    return run, stack


def named_params(stack) -> dict[str, torch.nn.Parameter]:
    return dict(unwrap_model(stack.model[0]).named_parameters())


def one_step(run, stack):
    train_ds, _, _ = build_datasets(run, dataset_tokenizer(vocab_size=run.data.vocab_size))
    result = train_step(run, data_iterators(train_ds, 0, run, 1), stack.model, stack.optimizer, stack.scheduler)
    reset_memory_statistics()  # leave no router statistics behind for other tests
    return result


def test_separate_learning_rates_in_param_groups():
    args, stack = make_stack("--moc-memory-lr", "6e-3", "--moc-bank-lr", "2e-3")
    groups = param_group_summary(stack.optimizer, stack.model)
    expected = {BACKBONE: (1e-3, 1e-4), MEMORY: (6e-3, 6e-4), BANK: (2e-3, 2e-4)}
    seen = set()
    for group in groups:
        if not group["params"]:
            continue
        assert len(group["roles"]) == 1, group
        role = group["roles"][0]
        assert (group["max_lr"], group["min_lr"]) == pytest.approx(expected[role]), group
        seen.add(role)
        if role == BANK:
            assert group["wd_mult"] == 1.0
    assert seen == {BACKBONE, MEMORY, BANK}
    assert any(g["expert"] and g["roles"] == [BANK] for g in groups), "routed chapters are expert parameters"

    one_step(args, stack)  # the scheduler sets each group's lr from its own max/min
    by_role = {g["roles"][0]: g for g in param_group_summary(stack.optimizer, stack.model) if g["params"]}
    lrs = {role: next(pg["lr"] for pg in stack.optimizer.param_groups if pg["max_lr"] == g["max_lr"])
           for role, g in by_role.items()}
    assert lrs[MEMORY] / lrs[BACKBONE] == pytest.approx(6.0)
    assert lrs[BANK] / lrs[BACKBONE] == pytest.approx(2.0)


def test_frozen_bank_has_no_gradient_and_no_optimizer_state():
    args, stack = make_stack("--moc-freeze-bank")
    params = named_params(stack)
    bank = {n: p for n, p in params.items() if param_role(n) == BANK}
    assert set(bank) == {"memory_bank.shared", "memory_bank.routed"}
    assert all(not p.requires_grad for p in bank.values())
    optimized = {id(p) for g in stack.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in bank.values())
    before = {n: p.detach().clone() for n, p in bank.items()}
    memory_before = params["decoder.layers.0.cross_attention.linear_o.weight"].detach().clone()

    result = one_step(args, stack)
    assert result.update_successful
    for name, p in bank.items():
        assert p.grad is None and getattr(p, "main_grad", None) is None, name
        assert torch.equal(p, before[name]), f"{name} changed although frozen"
    states = [s for sub in stack.optimizer.chained_optimizers for s in sub.optimizer.state]
    assert not any(id(s) in {id(p) for p in bank.values()} for s in states)
    assert all(not g["is_expert_parallel"] for g in stack.optimizer.param_groups), "no expert optimizer when frozen"
    assert not torch.equal(params["decoder.layers.0.cross_attention.linear_o.weight"], memory_before), "memory trains"


def test_memory_and_bank_weight_decay_groups():
    """--moc-bank-weight-decay 0 stops the bank's decay, --moc-memory-weight-decay scales the memory matrices', and
    the memory norms and the backbone keep theirs (0 for 1-D parameters, --weight-decay for matrices)."""
    args, stack = make_stack("--weight-decay", "0.1", "--moc-memory-lr", "6e-3",
                             "--moc-memory-weight-decay", "0.05", "--moc-bank-weight-decay", "0")
    names = {id(p): n for n, p in named_params(stack).items()}
    one_step(args, stack)
    decay_of = {}
    for group in stack.optimizer.param_groups:
        for p in group["params"]:
            decay_of[names[id(p)]] = group["weight_decay"]
    assert decay_of["memory_bank.routed"] == 0.0 and decay_of["memory_bank.shared"] == 0.0
    assert decay_of["decoder.layers.0.cross_attention.linear_o.weight"] == pytest.approx(0.05)
    memory_norms = [n for n in decay_of if param_role(n) == MEMORY and "norm" in n]
    assert memory_norms and all(decay_of[n] == 0.0 for n in memory_norms)
    assert decay_of["decoder.layers.0.mlp.linear_fc1.weight"] == pytest.approx(0.1)


def test_memory_weight_decay_needs_a_weight_decay_to_scale():
    from moc_megatron.errors import MoCError

    with pytest.raises((MoCError, SystemExit), match="needs --weight-decay > 0"):
        make_stack("--weight-decay", "0", "--moc-bank-weight-decay", "0.1")
