"""Runs one MoC memory layer under a TP x EP (x SP) layout and saves full outputs and gradients.

Launched by torchrun from tests/distributed/test_memory_parallel.py. Environment: TP, EP, SP, CASES
(comma-separated ``unit:gating[:skewed|:documents]``; ``documents``: the rows hold packed documents
of ragged lengths, given to the layer as document ids, with chunks restarting at document starts)
and OUT (written by rank 0: one result per case). The batch is
split over the data-parallel ranks (the expert-parallel ranks are data-parallel ranks too, as in
megatron); the saved tensors are reassembled so that every layout must give the single-process values.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from moc_megatron.config import MoCConfig
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.platform import destroy_distributed, initialize_distributed

BATCH, SEQ, HIDDEN = 4, 8, 32
# Packed documents per row (a new one wherever the id changes): a one-token document, ragged lengths, one
# whole-row document; every row of a data-parallel rank differs from the others.
DOCUMENT_IDS = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1],
                             [0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 2, 2, 2, 3, 3]])


def gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate ``t`` from every rank of ``group`` along ``dim``."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def summed(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over ``group``."""
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def main() -> None:
    tp, ep = int(os.environ["TP"]), int(os.environ["EP"])
    sp = os.environ.get("SP", "0") == "1"
    initialize_distributed(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    results = {}
    for case in os.environ["CASES"].split(","):
        unit, gating, *extra = case.split(":")
        results[case] = run_case(tp, ep, sp, unit, gating, extra == ["skewed"], extra == ["documents"])
    if dist.get_rank() == 0:
        torch.save(results, os.environ["OUT"])
    destroy_distributed()


def run_case(tp: int, ep: int, sp: bool, unit: str, gating: str, skewed: bool, documents: bool
             ) -> dict[str, torch.Tensor]:
    """Forward and backward of one memory layer; returns full (reassembled) tensors.

    ``skewed``: the router is biased so every unit picks chapters 0..k-1, all on the first EP rank; the
    other ranks then receive nothing and must still take part in both all-to-alls.
    """
    config = MoCConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, moc_memory_layers=[0], moc_num_chapters=9,
        moc_num_shared_chapters=1, moc_top_k=3, moc_chapter_size=4, moc_shared_bank=False, moc_chunk_size=4,
        moc_num_query_groups=2, moc_routing_unit=unit, moc_gating=gating,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=sp, use_cpu_initialization=True,
        params_dtype=torch.float64, moc_load_balance_coeff=0.0, moc_z_loss_coeff=0.0, add_bias_linear=False,
        reset_attention_mask=documents,
    )
    torch.manual_seed(0)
    module = MoCMemoryAttention(config, layer_number=1).double()
    with torch.no_grad():  # a non-zero W_O, identical to the single-process one
        full_o = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        width = module.linear_o.weight.shape[1]
        tp_rank = ps.get_tensor_model_parallel_rank()
        module.linear_o.weight.copy_(full_o[:, tp_rank * width:(tp_rank + 1) * width] * 0.2)
        if skewed:
            module.router.bias.copy_(torch.full_like(module.router.bias, -1e3))
            module.router.bias[: config.moc_top_k] = 1e3
    module.train()

    data = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    seq = slice(None)
    if sp:  # sequence parallelism: each tensor-parallel rank holds a slice of the sequence
        tp_rank = ps.get_tensor_model_parallel_rank()
        seq = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp)
    hidden = data[seq, rows].clone().requires_grad_(True)
    out, _ = module(hidden, key_value_states=DOCUMENT_IDS[rows] if documents else None)
    out.backward(grad_out[seq, rows])

    dp_group, tp_group = ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group()
    out, input_grad = out.detach(), hidden.grad
    if sp:
        out, input_grad = gather_cat(out, tp_group, 0), gather_cat(input_grad, tp_group, 0)
    ep_group = ps.get_expert_model_parallel_group()
    return {
        "out": gather_cat(out, dp_group, dim=1),
        "input_grad": gather_cat(input_grad, dp_group, dim=1),
        "bank_routed_grad": gather_cat(module.own_bank.routed.grad, ep_group, dim=0),
        "bank_shared_grad": summed(module.own_bank.shared.grad, dp_group),
        "router_grad": summed(module.router.weight.grad, dp_group),
        "routed_norm_grad": summed(module.routed_norm.weight.grad, dp_group),
        "q_grad": gather_cat(summed(module.linear_q.weight.grad, dp_group), tp_group, dim=0),
        "k_grad": gather_cat(summed(module.linear_k.weight.grad, dp_group), tp_group, dim=0),
        "o_grad": gather_cat(summed(module.linear_o.weight.grad, dp_group), tp_group, dim=1),
    }


if __name__ == "__main__":
    main()
