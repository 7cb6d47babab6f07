"""Multi-process (2 x gloo) tests of the CPU adaptation of megatron-core, one per adapted component.

Each test runs a ``_worker_*`` function on 2 processes through ``launch.run_distributed``; the
workers assert and the test fails with their output. Every worker compares the adapted megatron-core
component against a reference that does not use it (a single-process computation or another
parallel layout), so a missing or wrong adaptation fails as an error or as a mismatch.
"""

from __future__ import annotations

import os

import pytest
from launch import run_distributed

pytestmark = pytest.mark.distributed

TIMEOUT = 180


def _gather(tensor, group=None):  # noqa: ANN001, ANN202
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def _grads_by_name(model) -> dict:  # noqa: ANN001
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# tensor_parallel layers + mappings (+ sequence parallel, GlobalMemoryBuffer, broadcast_data)


def _worker_tensor_parallel() -> None:
    import _mcore_helpers as h
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from moc_megatron import platform

    batch = h.make_batches(1, micro_batch_size=2, seed=3)[0]
    # Non-gated MLP: with use_cpu_initialization the TP=2 shards are then exactly the TP=1 weights.
    overrides = dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu)

    platform.initialize_distributed(tensor_model_parallel_size=1)
    platform.model_parallel_manual_seed(1234)
    ref_model = h.tiny_gpt(h.tiny_config(**overrides))
    ref_loss = h.lm_loss(ref_model, batch)
    ref_loss.backward()
    ref_grads = _grads_by_name(ref_model)

    platform.initialize_distributed(tensor_model_parallel_size=2)
    platform.model_parallel_manual_seed(1234)
    tp_rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    for sequence_parallel in (False, True):
        model = h.tiny_gpt(h.tiny_config(sequence_parallel=sequence_parallel, **overrides))
        loss = h.lm_loss(model, batch)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            grad = param.grad
            if getattr(param, "sequence_parallel", False):
                dist.all_reduce(grad, group=tp_group)  # what finalize_model_grads does
            expected = ref_grads[name.replace(".norm.", ".")]
            if getattr(param, "tensor_model_parallel", False):
                expected = expected.chunk(2, dim=param.partition_dim)[tp_rank]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=f"grad of {name}")

    # GPU-style initialisation (layers.py:261...): shards allocated on the "current device".
    model = h.tiny_gpt(h.tiny_config(use_cpu_initialization=False))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.isfinite(h.lm_loss(model, batch))

    # broadcast_data: TP rank 0's batch reaches every TP rank.
    data = {k: v for k, v in batch.items() if k != "position_ids"} if tp_rank == 0 else None
    got = tensor_parallel.broadcast_data(["tokens", "labels"], data, torch.int64)
    assert torch.equal(got["tokens"], batch["tokens"]) and torch.equal(got["labels"], batch["labels"])
    platform.destroy_distributed()


def test_tensor_parallel_layers_match_single_process() -> None:
    """TP=2 (with and without sequence parallel) gives the TP=1 loss and gradient shards."""
    run_distributed(_worker_tensor_parallel, nprocs=2, timeout=TIMEOUT)


# ----------------------------------------------------------------------------------------------
# RNG tracker + activation recompute


def _worker_rng_and_recompute() -> None:
    import _mcore_helpers as h
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from moc_megatron import platform

    platform.initialize_distributed(tensor_model_parallel_size=2)
    tp_group = ps.get_tensor_model_parallel_group()
    tracker = tensor_parallel.get_cuda_rng_tracker()

    platform.model_parallel_manual_seed(1234)
    with tracker.fork():
        tp_draw = torch.rand(8)
    with tracker.fork(tensor_parallel.random.get_data_parallel_rng_tracker_name()):
        dp_draw = torch.rand(8)
    default_draw = torch.rand(8)
    torch.manual_seed(1234)
    assert torch.equal(default_draw, torch.rand(8)), "fork() consumed the default generator"
    tp_draws, dp_draws = _gather(tp_draw, tp_group), _gather(dp_draw, tp_group)
    assert not torch.equal(*tp_draws), "'model-parallel-rng' must differ across TP ranks"
    assert torch.equal(*dp_draws), "'data-parallel-rng' must agree across TP ranks"

    batch = h.make_batches(1, seed=5)[0]
    dropout = dict(hidden_dropout=0.2, attention_dropout=0.2)

    def run(seed_again: bool = True, **recompute: object) -> tuple[torch.Tensor, dict]:
        model = h.tiny_gpt(h.tiny_config(**dropout, **recompute))
        model.train()
        if seed_again:
            platform.model_parallel_manual_seed(99)
        loss = h.lm_loss(model, batch)
        loss.backward()
        return loss.detach(), _grads_by_name(model)

    ref_loss, ref_grads = run()
    again_loss, _ = run()
    assert torch.equal(ref_loss, again_loss), "dropout not reproducible after reseeding"
    other_loss, _ = run(seed_again=False)
    assert not torch.equal(ref_loss, other_loss), "dropout masks did not change with the RNG state"

    variants = {
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "full+distributed": dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
            distribute_saved_activations=True,
        ),
        "selective": dict(recompute_granularity="selective"),
    }
    for kind, recompute in variants.items():
        loss, grads = run(**recompute)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, msg=f"recompute={kind} loss")
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=f"{kind}: {name}")
    platform.destroy_distributed()


def test_rng_tracker_and_recompute() -> None:
    """Tracker states per TP rank; reproducible dropout; recompute gives the no-recompute grads."""
    run_distributed(_worker_rng_and_recompute, nprocs=2, timeout=TIMEOUT)


# ----------------------------------------------------------------------------------------------
# pipeline schedules + p2p communication + tied embeddings across stages


def _worker_pipeline() -> None:
    import _mcore_helpers as h
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moc_megatron import platform

    num_microbatches, micro_batch_size = 4, 2
    batches = h.make_batches(num_microbatches, micro_batch_size, seed=11)

    platform.initialize_distributed(pipeline_model_parallel_size=1)
    platform.model_parallel_manual_seed(1234)
    full = h.tiny_gpt(h.tiny_config(num_layers=4))
    ref_losses = []
    for batch in batches:
        loss = h.lm_loss(full, batch)
        (loss / num_microbatches).backward()
        ref_losses.append(loss.detach())
    full_weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    ref_grads = _grads_by_name(full)

    layouts = [
        dict(virtual=None, overrides=dict(batch_p2p_comm=True)),  # p2p_communication.py:398 synchronize
        dict(virtual=None, overrides=dict(batch_p2p_comm=False)),
        # Interleaving at PP=2 needs unbatched p2p on every backend: with batch_p2p_comm the sends to
        # the one peer (prev == next) are matched in the wrong order (NVIDIA/Megatron-LM#750).
        dict(virtual=2, overrides=dict(batch_p2p_comm=False, overlap_p2p_comm=True)),
    ]
    for layout in layouts:
        vpp = layout["virtual"]
        platform.initialize_distributed(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)
        platform.model_parallel_manual_seed(1234)
        config = h.tiny_config(num_layers=4, **layout["overrides"])
        chunks = [h.tiny_gpt(config, vp_stage=v if vpp else None) for v in range(vpp or 1)]
        is_last = ps.is_pipeline_last_stage()
        if is_last:  # tied output layer got the first stage's embedding (language_module.py:244)
            assert torch.equal(chunks[-1].output_layer.weight, full_weights["embedding.word_embeddings.weight"])
        to_full = {}
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                full_name = name
                if name.startswith("decoder.layers."):
                    index = int(name.split(".")[2])
                    global_index = chunk.decoder.layers[index].layer_number - 1
                    full_name = name.replace(f"decoder.layers.{index}.", f"decoder.layers.{global_index}.", 1)
                if name == "output_layer.weight":
                    full_name = "embedding.word_embeddings.weight"
                with torch.no_grad():
                    param.copy_(full_weights[full_name])
                to_full[param] = full_name

        losses = get_forward_backward_func()(
            forward_step_func=h.forward_step,
            data_iterator=[iter(batches) for _ in chunks] if vpp else iter(batches),
            model=chunks if vpp else chunks[0],
            num_microbatches=num_microbatches,
            seq_length=h.SEQ,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        if is_last:
            got = torch.stack([d["lm loss"] for d in losses])
            torch.testing.assert_close(got, torch.stack(ref_losses), rtol=1e-5, atol=1e-6, msg=f"{layout}")
        for param, full_name in to_full.items():
            if "embedding" in full_name or full_name == "output_layer.weight" or param.grad is None:
                continue  # tied-embedding grads are summed across stages by finalize_model_grads
            torch.testing.assert_close(
                param.grad, ref_grads[full_name], rtol=1e-4, atol=1e-6, msg=f"{layout}: {full_name}"
            )
    platform.destroy_distributed()


def test_pipeline_schedules_match_single_stage() -> None:
    """1F1B (batched and unbatched p2p) and interleaved PP=2 give the PP=1 losses and grads."""
    run_distributed(_worker_pipeline, nprocs=2, timeout=TIMEOUT)


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel + distributed optimizer + get_megatron_optimizer (+ clip)


def _local_shards_match(ddp, ref_by_param: dict, rtol: float, atol: float) -> None:  # noqa: ANN001
    """With the distributed optimizer each DP rank owns one shard of each bucket's reduced grads."""
    import torch
    from megatron.core import parallel_state as ps

    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for buffer in ddp.buffers:
        for bucket in buffer.buckets:
            expected = torch.zeros_like(bucket.grad_data)
            for param in bucket.params_list:
                start, end, _ = buffer.param_index_map[param]
                expected[start - bucket.offset : end - bucket.offset] = ref_by_param[param].flatten()
            shard = bucket.grad_data.numel() // dp_size
            sl = slice(dp_rank * shard, (dp_rank + 1) * shard)
            torch.testing.assert_close(bucket.grad_data[sl], expected[sl], rtol=rtol, atol=atol)


def _worker_ddp_optimizer() -> None:
    import _mcore_helpers as h
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from moc_megatron import platform

    platform.initialize_distributed()
    dp_rank, dp_group = ps.get_data_parallel_rank(), ps.get_data_parallel_group()
    all_batches = h.make_batches(2, micro_batch_size=2, seed=21)  # one per DP rank

    platform.model_parallel_manual_seed(1234)
    ref = h.tiny_gpt(h.tiny_config())
    h.lm_loss(ref, h.concat_batches(all_batches)).backward()
    ref_grads = _grads_by_name(ref)
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
    clip = 0.5 * ref_norm  # clipping active: gradients are halved
    lr, eps = 1e-2, 1e-2  # eps of the order of the gradients, so the Adam update depends on clipping

    for bf16 in (False, True):
        for distopt in (False, True):
            tag = f"bf16={bf16} distributed_optimizer={distopt}"
            config = h.tiny_config(bf16=bf16)
            module = h.tiny_gpt(config)
            if bf16:
                module = Float16Module(config, module)
            ddp = DistributedDataParallel(
                config=config,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, use_distributed_optimizer=distopt, overlap_grad_reduce=False
                ),
                module=module,
            )
            named = dict(h.unwrap(ddp).named_parameters())
            ref_by_param = {p: ref_grads[n] for n, p in named.items()}
            rtol, atol = (5e-2, 2e-3) if bf16 else (1e-5, 1e-7)

            ddp.zero_grad_buffer()
            h.lm_loss(ddp, all_batches[dp_rank]).backward()
            finalize_model_grads([ddp])
            if distopt:
                _local_shards_match(ddp, ref_by_param, rtol, atol)
            else:
                for name, param in named.items():
                    assert torch.equal(*_gather(param.main_grad, dp_group)), f"{tag}: {name} differs across DP"
                    torch.testing.assert_close(param.main_grad, ref_grads[name], rtol=rtol, atol=atol)

            optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam", lr=lr, adam_eps=eps, weight_decay=0.0, clip_grad=clip,
                    bf16=bf16, params_dtype=config.params_dtype, use_distributed_optimizer=distopt,
                ),
                [ddp],
            )
            before = {n: p.detach().float().clone() for n, p in named.items()}
            ok, grad_norm, _ = optimizer.step()
            assert ok, tag
            assert grad_norm == pytest.approx(ref_norm, rel=rtol), tag
            deltas, expected = {}, {}
            for name, param in named.items():
                after = param.detach().float()
                assert torch.equal(*_gather(after, dp_group)), f"{tag}: {name} differs across DP after step"
                # First Adam step: m_hat = g, sqrt(v_hat) = |g| for the clipped gradient g.
                clipped = ref_grads[name] * clip / (ref_norm + 1e-6)
                deltas[name], expected[name] = after - before[name], -lr * clipped / (clipped.abs() + eps)
            if bf16:  # bf16 parameters round small updates away (e.g. of norm weights near 1)
                flat = [torch.cat([d[n].flatten() for n in named]) for d in (deltas, expected)]
                cos = torch.nn.functional.cosine_similarity(*flat, dim=0)
                assert cos > 0.99, f"{tag}: update direction cos={cos:.4f}"
            else:
                for name in named:
                    torch.testing.assert_close(deltas[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    platform.destroy_distributed()


def test_ddp_and_optimizer_match_single_process() -> None:
    """DP=2 DDP (+ distributed optimizer, fp32 and bf16) grads and a clipped Adam step equal DP=1."""
    run_distributed(_worker_ddp_optimizer, nprocs=2, timeout=TIMEOUT)


# ----------------------------------------------------------------------------------------------
# dist_checkpointing save / load (+ resharding, fully parallel save)


def _worker_checkpoint() -> None:
    import _mcore_helpers as h
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    from moc_megatron import platform

    root = os.environ["CKPT_DIR"]
    batch = h.make_batches(1, seed=31)[0]

    def fresh_dir(name: str) -> str:
        path = os.path.join(root, name)
        if dist.get_rank() == 0:
            os.makedirs(path)
        dist.barrier()
        return path

    def load_into(model, path):  # noqa: ANN001, ANN202
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))

    platform.initialize_distributed(tensor_model_parallel_size=2)
    platform.model_parallel_manual_seed(1234)
    saved = h.tiny_gpt(h.tiny_config(), seed=0)
    with torch.no_grad():  # make the weights differ from any fresh initialisation
        for p in saved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved_loss = h.lm_loss(saved, batch).detach()
    tp2_dir = fresh_dir("tp2")
    dist_checkpointing.save(saved.sharded_state_dict(), tp2_dir)

    loaded = h.tiny_gpt(h.tiny_config(), seed=1)
    load_into(loaded, tp2_dir)
    for (name, a), b in zip(saved.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), f"TP=2 round trip changed {name}"

    platform.initialize_distributed(tensor_model_parallel_size=1)
    platform.model_parallel_manual_seed(1234)
    resharded = h.tiny_gpt(h.tiny_config(), seed=2)
    assert not torch.allclose(h.lm_loss(resharded, batch), saved_loss)
    load_into(resharded, tp2_dir)
    torch.testing.assert_close(h.lm_loss(resharded, batch).detach(), saved_loss, rtol=1e-5, atol=1e-6)

    # Fully parallel save: the DP ranks split the writing (fully_parallel.py).
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True)
    )
    fp_dir = fresh_dir("fully_parallel")
    dist_checkpointing.save(resharded.sharded_state_dict(), fp_dir, sharded_strategy=strategy)
    again = h.tiny_gpt(h.tiny_config(), seed=3)
    load_into(again, fp_dir)
    for (name, a), b in zip(resharded.named_parameters(), again.parameters()):
        assert torch.equal(a, b), f"fully parallel round trip changed {name}"
    platform.destroy_distributed()


def test_dist_checkpointing_round_trip_and_reshard(tmp_path) -> None:  # noqa: ANN001
    """torch_dist save/load is bit-identical at TP=2; TP=2 -> TP=1 keeps the loss; fully
    parallel save works."""
    run_distributed(_worker_checkpoint, nprocs=2, env={"CKPT_DIR": str(tmp_path)}, timeout=TIMEOUT)
