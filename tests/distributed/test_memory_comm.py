"""At EP=2 (gloo) the counted memory all-to-all bytes are what really crosses ranks, and the formula's.

The worker wraps ``torch.distributed.all_to_all_single`` (which megatron's ``all_to_all`` calls too) to
tally the bytes each rank sends to the other rank, forward and backward, and compares them with what the
memory layer counted from its dispatch plans and with the analytic formula of
:func:`moc_megatron.memory.dispatcher.all_to_all_bytes` for a routing known in advance.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from launch import run_distributed

pytestmark = pytest.mark.distributed

SEQ, BATCH, HIDDEN, HEADS, CHUNK, TOP_K = 8, 2, 32, 4, 4, 3


def _counting_all_to_all(tally: dict[str, int], phase: list[str]):
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        rows = input_split_sizes or [input.shape[0] // size] * size
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        tally[phase[0]] += sum(n for r, n in enumerate(rows) if r != rank) * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    return original, counting


def _worker() -> None:
    from moc_megatron.config import MoCConfig
    from moc_megatron.memory.memory_attention import MoCMemoryAttention
    from moc_megatron.platform import destroy_distributed, initialize_distributed
    from moc_megatron.training.logging import reduce_memory_comm

    ep = int(os.environ["EP"])
    initialize_distributed(expert_model_parallel_size=ep)
    rank = dist.get_rank()
    config = MoCConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, moc_memory_layers=[0], moc_num_chapters=9,
        moc_num_shared_chapters=1, moc_top_k=TOP_K, moc_chapter_size=4, moc_shared_bank=False,
        moc_chunk_size=CHUNK, moc_routing_unit="chunk", moc_attention_impl="gather",
        expert_model_parallel_size=ep, use_cpu_initialization=True, params_dtype=torch.float64,
    )
    torch.manual_seed(0)
    module = MoCMemoryAttention(config, layer_number=1).double().train()
    tally, phase = {"forward": 0, "backward": 0}, ["forward"]
    original, counting = _counting_all_to_all(tally, phase)
    dist.all_to_all_single = counting
    try:
        for skewed in (False, True):
            if skewed:  # every unit picks chapters 0..k-1: all on expert-parallel rank 0
                with torch.no_grad():
                    module.router.bias.fill_(-1e3)
                    module.router.bias[:TOP_K] = 1e3
            tally.update(forward=0, backward=0)
            hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
            phase[0] = "forward"
            out, _ = module(hidden)
            phase[0] = "backward"
            out.sum().backward()
            counted = module.compute_comm_metrics()
            assert (counted.forward, counted.backward) == (tally["forward"], tally["backward"]), (counted, tally)
            assert counted.forward > 0 and counted.backward > 0
            if skewed:
                n = BATCH * SEQ // CHUNK  # units per rank
                q = o = CHUNK * HEADS * config.moc_head_dim * 8  # fp64 queries and partial outputs
                w, lse, idx = TOP_K * 8, CHUNK * HEADS * 8, TOP_K * 8
                if rank == 0:  # receives every other rank's units, sends none
                    want = ((ep - 1) * 8 + (ep - 1) * n * (o + lse), (ep - 1) * n * (q + w))
                else:
                    want = ((ep - 1) * 8 + n * (idx + q + w), n * (o + lse))
                assert (counted.forward, counted.backward) == want, (counted, want)
            totals = torch.tensor([tally["forward"], tally["backward"]], dtype=torch.float64)
            peak = totals.sum().reshape(1)
            dist.all_reduce(totals)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            reduced = reduce_memory_comm([module])  # what the training log reads, then resets
            assert reduced == {"forward": totals[0].item(), "backward": totals[1].item(), "ranks": float(ep),
                               "max_rank": peak.item()}, reduced
            assert module.compute_comm_metrics().total == 0
        with torch.no_grad():  # no training forward: nothing counted
            module(hidden)
        assert module.compute_comm_metrics().total == 0
    finally:
        dist.all_to_all_single = original
    destroy_distributed()


def test_counted_all_to_all_bytes_are_the_real_traffic_at_ep2():
    run_distributed(_worker, nprocs=2, env={"EP": "2"}, timeout=180)
