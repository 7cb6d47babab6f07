"""Router-owned chapter-load statistics, the dispatchers' frozen plans and the all-to-all byte count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moc_megatron.config import MoCConfig
from moc_megatron.memory.dispatcher import (
    Dispatched,
    DispatchPlan,
    LocalDispatcher,
    all_to_all_bytes,
    make_dispatcher,
    route_to_owners,
)
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.memory.router import pool_routing_units
from moc_megatron.memory.units import RoutingUnits
from moc_megatron.training.logging import memory_layers, reduce_chapter_load, reset_memory_statistics

pytestmark = pytest.mark.usefixtures("mcore_world")

HIDDEN, SEQ, BATCH = 32, 12, 3


def make_config(**overrides) -> MoCConfig:
    base = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, moc_memory_layers=[0, 1], moc_num_chapters=9,
        moc_num_shared_chapters=1, moc_top_k=3, moc_chapter_size=4, moc_shared_bank=False, moc_chunk_size=4,
        moc_routing_unit="chunk", use_cpu_initialization=True, params_dtype=torch.float64,
    )
    base.update(overrides)
    return MoCConfig(**base)


def naive_counts(module: MoCMemoryAttention, hidden: torch.Tensor) -> torch.Tensor:
    """The chapter selection counts of one forward, from the router's parameters directly."""
    cfg = module.config
    feats = pool_routing_units(hidden, cfg.moc_routing_unit, cfg.moc_chunk_size)
    probs = torch.softmax(feats @ module.router.weight.t() + module.router.bias, -1)
    chosen = torch.topk(probs, cfg.moc_top_k).indices
    return torch.bincount(chosen.flatten(), minlength=cfg.moc_num_routed_chapters).double()


def test_router_owns_chapter_load_counted_in_training_forwards_only():
    config = make_config()
    torch.manual_seed(0)
    layers = [MoCMemoryAttention(config, layer_number=n).double().train() for n in (1, 2)]
    reset_memory_statistics(layers)
    with torch.no_grad():
        for layer in layers:
            layer.router.bias.normal_(0, 1.0)
    want = {0: torch.zeros(8, dtype=torch.float64), 1: torch.zeros(8, dtype=torch.float64)}
    for _micro_batch in range(2):  # two micro-batches accumulate
        hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
        for i, layer in enumerate(layers):
            layer(hidden)[0].sum().backward()
            want[i] += naive_counts(layer, hidden)
    layers[0].eval()
    layers[0](torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64))  # evaluation: not counted
    layers[1].train()
    with torch.no_grad():
        layers[1](torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64))  # no gradient: not counted
    for i, layer in enumerate(layers):
        torch.testing.assert_close(layer.router.compute_metrics(), want[i])
    # The logged values: per 0-based layer, reduced over the (single-rank) world, then reset.
    loads = reduce_chapter_load(config, layers)
    assert sorted(loads) == [0, 1]
    for i in range(2):
        torch.testing.assert_close(loads[i], want[i])
        assert loads[i].sum() == 2 * BATCH * 3 * config.moc_top_k  # 3 chunks per sequence, top-3
    assert all(layer.router.compute_metrics().sum() == 0 for layer in layers)
    assert reduce_chapter_load(config, layers)[0].sum() == 0


def test_chapter_load_buffer_is_not_in_checkpoints_and_keeps_its_dtype():
    module = MoCMemoryAttention(make_config(params_dtype=torch.float32), layer_number=1).train()
    module(torch.randn(SEQ, BATCH, HIDDEN))[0].sum().backward()
    before = module.router.compute_metrics()
    assert before.sum() > 0
    assert not any("chapter_load" in key for key in module.state_dict())
    module.bfloat16()  # megatron's Float16Module casts the model; integer counts must survive exactly
    assert module.router.chapter_load.dtype == torch.long
    torch.testing.assert_close(module.router.compute_metrics(reset=True), before)
    assert module.router.chapter_load.sum() == 0


def test_memory_layers_found_through_wrappers():
    config = make_config()
    inner = torch.nn.ModuleList([MoCMemoryAttention(config, layer_number=n) for n in (1, 2)])
    wrapped = torch.nn.Sequential(torch.nn.Identity(), inner)
    assert memory_layers([wrapped]) == list(inner)


@pytest.mark.parametrize("unit", ["sequence", "chunk", "token"])
def test_routing_units_split_join_and_pool_agree_on_the_layout(unit):
    units = RoutingUnits(unit, 5)
    x = torch.randn(SEQ, BATCH, 2, 3, dtype=torch.float64)
    split = units.split(x)
    assert split.shape[:2] == (BATCH * units.units_per_sequence(SEQ), units.unit_length(SEQ))
    torch.testing.assert_close(units.join(split, SEQ, BATCH), x)
    hidden = torch.randn(SEQ, BATCH, 4, dtype=torch.float64)
    pooled = units.pool(hidden)
    assert pooled.shape[0] == split.shape[0]
    # unit i of the pool and of split belong to the same sequence (b = i // units_per_sequence)
    per_seq = units.units_per_sequence(SEQ)
    b = 1
    if unit == "sequence":
        torch.testing.assert_close(pooled[b], hidden[:, b].mean(0))
    elif unit == "token":
        torch.testing.assert_close(pooled[b * per_seq + 7], hidden[7, b])
    else:  # chunk j is routed from the mean of the tokens before it
        torch.testing.assert_close(pooled[b * per_seq + 2], hidden[:10, b].mean(0))


def test_plans_are_frozen_and_local_dispatch_sends_nothing():
    query, chapters = torch.randn(4, 2, 2, 8), torch.tensor([[0, 3], [1, 2], [4, 5], [7, 6]])
    weights = torch.rand(4, 2, requires_grad=True)
    dispatcher = make_dispatcher(8, 0, 1, None)
    assert isinstance(dispatcher, LocalDispatcher)
    sent = dispatcher.dispatch(query, chapters, weights, 0)
    assert not sent.plan.merges and sent.query is query and not sent.reads_shared.any()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sent.plan.num_units = 3
    assert sent.plan.units_sent == sent.plan.units_received == 0
    assert all_to_all_bytes(sent, query, None).total == 0
    assert dispatcher.combine(sent.plan, query, None) is query
    assert not hasattr(dispatcher, "_plan")
    with pytest.raises(ValueError, match="expert-parallel process group"):
        make_dispatcher(8, 0, 2, None)


def _fake_plans(routings: list[torch.Tensor], chapters_per_rank: int) -> list[tuple[DispatchPlan, torch.Tensor]]:
    """Each simulated rank's plan and received local indices, matching sends to receives by hand."""
    ep = len(routings)
    routes = [route_to_owners(c, chapters_per_rank, ep) for c in routings]
    sends = [torch.bincount(dest, minlength=ep).tolist() for _, dest, _ in routes]
    plans = []
    for r, (unit_index, _, _) in enumerate(routes):
        recv = tuple(sends[src][r] for src in range(ep))
        received = torch.cat([local[dest == r] for _, dest, local in routes])
        plans.append((DispatchPlan(unit_index, tuple(sends[r]), recv, len(routings[r]), r), received))
    return plans


def test_all_to_all_bytes_match_the_formula_for_a_known_routing():
    """Two simulated expert-parallel ranks, 8 routed chapters (4 per rank), top-2.

    Rank 0's units pick {0,1} {0,5} {6,7}: one goes to rank 0 only, one to both, one to rank 1 only, so
    rank 0 sends 2 unit copies off-rank; rank 1's units pick {1,2} {4,5} {4,0}: two copies go to rank 0
    (rank 1 receives 2 and keeps 2 of its own).
    """
    routings = [torch.tensor([[0, 1], [0, 5], [6, 7]]), torch.tensor([[1, 2], [4, 5], [4, 0]])]
    u, h, e, k = 4, 2, 8, 2
    plans = _fake_plans(routings, 4)
    assert [(p.units_sent, p.units_received) for p, _ in plans] == [(2, 2), (2, 2)]
    assert plans[0][0].send_splits == (2, 2) and plans[1][0].send_splits == (2, 2)
    torch.testing.assert_close(plans[1][1], torch.tensor([[-1, 1], [2, 3], [0, 1], [0, -1]]))
    for dtype, lse_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        q, w, o, lrow = u * h * e * dtype.itemsize, k * 4, u * h * e * dtype.itemsize, u * h * lse_dtype.itemsize
        for plan, received in plans:
            m = sum(plan.recv_splits)
            routed_w = torch.zeros(m, k, requires_grad=True)
            sent = Dispatched(torch.zeros(m, u, h, e, dtype=dtype, requires_grad=True), received, routed_w,
                              torch.zeros(m, dtype=torch.bool), plan, routed_w)
            out = torch.zeros(m, u, h, e, dtype=dtype, requires_grad=True)
            lse = torch.zeros(m, u, h, dtype=lse_dtype, requires_grad=True)
            m_s, m_r = plan.units_sent, plan.units_received
            got = all_to_all_bytes(sent, out, lse)
            assert got.forward == 8 + m_s * (8 * k + q + w) + m_r * (o + lrow)
            assert got.backward == m_r * (q + w) + m_s * (o + lrow)
            if dtype == torch.float32:  # the numbers, spelled out: q = o = 256, w = 8, l = 32, 8k = 16
                assert (got.forward, got.backward) == (8 + 2 * 280 + 2 * 288, 2 * 264 + 2 * 288)
            mixture = all_to_all_bytes(sent, out, None)  # mixture gating: no log-sum-exp travels
            assert mixture.forward == got.forward - m_r * lrow and mixture.backward == got.backward - m_s * lrow
            frozen = all_to_all_bytes(dataclasses.replace(sent, query=sent.query.detach(),
                                                          sent_weights=sent.sent_weights.detach()),
                                      out.detach(), None)
            assert frozen.backward == 0  # nothing requires a gradient: no backward traffic


def test_process_groups_arrive_through_pg_collection():
    """megatron's blocks pass the model's ``pg_collection`` to the memory layers; the bank takes it too."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.parallel.groups import MEMORY_GROUPS, memory_groups

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    mpu_ep = pgs.ep
    for name in MEMORY_GROUPS:  # groups of their own: what the layers get can only have come from pgs
        setattr(pgs, name, dist.new_group([0]))
    config = MoCConfig(num_layers=2, hidden_size=32, num_attention_heads=4, moc_memory_layers=[1],
                       moc_num_chapters=5, moc_top_k=2, moc_chapter_size=4, use_cpu_initialization=True)
    model = MoCGPTModel(config, 64, 16, pg_collection=pgs)
    assert model.pg_collection is pgs
    (layer,) = model.memory_layers()
    for name in MEMORY_GROUPS:
        assert getattr(layer.groups, name) is getattr(pgs, name)
        assert getattr(model.memory_bank.groups, name) is getattr(pgs, name)
    assert (layer.groups.ep_size, layer.groups.ep_rank, layer.groups.tp_size) == (1, 0, 1)
    assert layer.groups.ep is not mpu_ep
    # without a collection: parallel_state's groups
    assert memory_groups().ep is mpu_ep
