"""The distributed-optimizer checkpoint adaptations, one object at a time (the 8-process chain that needs
them is tests/distributed/test_wide_layout.py).

megatron's ``DistributedOptimizer`` is built without ``__init__`` here: only the attributes the patched
methods read are set, so each test isolates one behaviour of megatron-core 0.16.1 with torch's Adam.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer

from moc_megatron.platform import optimizer_state, reshardable_optimizer


def _distributed_optimizer(params: list[torch.nn.Parameter]) -> DistributedOptimizer:
    opt = DistributedOptimizer.__new__(DistributedOptimizer)
    opt.config = OptimizerConfig(lr=1e-3)
    opt.optimizer = torch.optim.Adam(params or [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    if not params:
        opt.optimizer.param_groups[0]["params"] = []  # megatron keeps aligned, empty groups
    opt.grad_scaler = None
    opt.model_param_group_index_map = {p: (0, i) for i, p in enumerate(params)}
    return opt


def test_torch_adam_takes_model_space_state_without_a_per_parameter_step():
    main = torch.nn.Parameter(torch.zeros(3))
    opt = _distributed_optimizer([main])
    opt.optimizer.state[main] = {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3), "step": torch.tensor(4.0)}
    loaded = {"param": torch.full((3,), 1.0), "exp_avg": torch.full((3,), 2.0), "exp_avg_sq": torch.full((3,), 3.0)}
    with torch.no_grad(), pytest.raises(KeyError, match="step"):  # megatron-core 0.16.1 as shipped
        opt._set_main_param_and_optimizer_states(main, loaded)

    reshardable_optimizer.allow_model_space_load(opt)
    with torch.no_grad():  # as megatron's loaders
        opt._set_main_param_and_optimizer_states(main, loaded)
    state = opt.optimizer.state[main]
    assert main.detach().tolist() == [1.0] * 3
    assert state["exp_avg"].tolist() == [2.0] * 3 and state["exp_avg_sq"].tolist() == [3.0] * 3
    assert state["step"].item() == 4.0  # left to the param groups, not dropped


def test_an_empty_distributed_optimizer_reports_its_chains_step():
    """fully_reshardable stores rank 0's param groups for every rank: an empty expert optimizer there
    (no bank on the first stage) must carry the step of the rank's other optimizers, not 0."""
    dense_param = torch.nn.Parameter(torch.zeros(2))
    dense = _distributed_optimizer([dense_param])
    dense.optimizer.state[dense_param] = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2),
                                          "step": torch.tensor(6.0)}
    empty = _distributed_optimizer([])
    chain = ChainedOptimizer.__new__(ChainedOptimizer)
    chain.chained_optimizers = [dense, empty]

    optimizer_state.allow_empty_distributed_optimizers(chain)
    groups = empty.state_dict()["optimizer"]["param_groups"]
    assert groups and all(group["step"] == 6.0 for group in groups)


@pytest.mark.parametrize("sharding", ["fully_reshardable", "dp_reshardable"])
def test_cpu_fully_reshardable_save_gathers_over_gloo(monkeypatch, sharding):
    metadata = {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": sharding}
    monkeypatch.setattr(reshardable_optimizer, "using_gpu", lambda: False)
    on_cpu = reshardable_optimizer.sharded_state_dict_metadata(metadata)
    assert on_cpu.get("distrib_optim_fully_reshardable_mem_efficient") is (True if sharding == "fully_reshardable"
                                                                           else None)
    monkeypatch.setattr(reshardable_optimizer, "using_gpu", lambda: True)
    assert reshardable_optimizer.sharded_state_dict_metadata(metadata) == metadata
    assert "distrib_optim_fully_reshardable_mem_efficient" not in metadata  # the stored record is unchanged
