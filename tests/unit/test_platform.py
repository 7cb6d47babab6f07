"""Single-process tests of moc_megatron.platform: platform selection, the two shim mechanisms and one
test per adapted megatron-core component (the multi-process side is in
tests/distributed/test_platform_distributed.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from moc_megatron import platform
from moc_megatron.platform import cpu_adapter
from moc_megatron.platform._cpu_shims import bind_cpu_torch, cpu_torch, cuda_tensor_methods_on_cpu
from moc_megatron.platform.cpu_rng import CpuRNGStatesTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import _mcore_helpers as h  # noqa: E402

# The component tests build CPU models and check the CPU adaptation; on a GPU (where nothing is
# adapted) run them with MOC_FORCE_CPU=1.
on_cpu = pytest.mark.skipif(platform.using_gpu(), reason="checks the CPU adaptation")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# platform selection and the mechanisms


def test_platform_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("MOC_FORCE_CPU", raising=False)
    assert platform.using_gpu()
    assert platform.get_device() == torch.device("cuda", 1)
    assert platform.dist_backend() == "nccl"
    assert platform.transformer_config_overrides() == {}

    monkeypatch.setenv("MOC_FORCE_CPU", "1")
    assert not platform.using_gpu()
    assert platform.get_device() == torch.device("cpu")
    assert platform.dist_backend() == "gloo"
    assert platform.transformer_config_overrides()["gradient_accumulation_fusion"] is False


@on_cpu
def test_init_platform_applies_every_adaptation_once(mcore_world: None) -> None:
    from megatron.core.pipeline_parallel import schedules

    platform.init_platform()
    assert cpu_adapter.applied() == cpu_adapter.all_adaptations()
    platform.init_platform()
    cpu_adapter.apply()
    assert cpu_adapter.applied() == cpu_adapter.all_adaptations()
    assert schedules.torch is cpu_torch
    # The process-wide torch is untouched: only adapted megatron-core modules see the CPU as CUDA.
    assert not hasattr(torch.zeros, "__wrapped__") and torch.cuda.current_device is not cpu_torch.cuda.current_device


def test_cpu_torch_view() -> None:
    assert cpu_torch.zeros(2, device="cuda").device.type == "cpu"
    assert cpu_torch.tensor([1.0], device=cpu_torch.cuda.current_device()).device.type == "cpu"
    assert cpu_torch.empty_like(torch.ones(2), device="cuda:0").device.type == "cpu"
    assert cpu_torch.ones(1, device="cpu").device.type == "cpu"
    assert not cpu_torch.cuda.is_available()
    cpu_torch.cuda.synchronize()
    stream = cpu_torch.cuda.Stream()
    stream.wait_stream(cpu_torch.cuda.current_stream())
    with cpu_torch.cuda.stream(stream):
        event = stream.record_event()
    event.wait()
    assert event.query()
    assert cpu_torch.matmul is torch.matmul and cpu_torch.distributed is torch.distributed


def test_bind_cpu_torch_refuses_a_module_without_torch() -> None:
    with pytest.raises(RuntimeError, match="layout changed"):
        bind_cpu_torch(types.ModuleType("not_megatron"))


def test_cuda_tensor_methods_are_scoped() -> None:
    x, y = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    with cuda_tensor_methods_on_cpu():
        assert x.type() == "torch.cuda.FloatTensor" and y.type() == "torch.cuda.BFloat16Tensor"
        assert x.cuda() is x
        assert x.type(torch.float64).dtype == torch.float64
    assert x.type() == "torch.FloatTensor"


# ---------------------------------------------------------------------------------------------
# adapted components, single process


@on_cpu
def test_global_memory_buffer(mcore_world: None) -> None:
    """utils.py:631 - the sequence-parallel all-gather buffer."""
    buffer = ps.get_global_memory_buffer().get_tensor((4, 8), torch.float32, "mpu")
    assert buffer.shape == (4, 8) and buffer.device.type == "cpu"


@on_cpu
def test_rotary_embedding(mcore_world: None) -> None:
    """rotary_pos_embedding.py:162,297 - RoPE frequencies on the compute device."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(max_seq_len=8)
    assert emb.shape == (8, 1, 1, 16) and emb.device == platform.get_device()
    torch.testing.assert_close(rope(max_seq_len=8), emb)


@on_cpu
def test_broadcast_data(mcore_world: None) -> None:
    """tensor_parallel/data.py:37,84,86."""
    data = {"tokens": torch.arange(6).view(2, 3)}
    out = tensor_parallel.broadcast_data(["tokens"], data, torch.int64)
    assert torch.equal(out["tokens"].cpu(), data["tokens"])


@on_cpu
def test_rng_tracker_fork(mcore_world: None) -> None:
    """random.py:235,315,422 - named CPU generator states, seeded by megatron's own function."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    platform.model_parallel_manual_seed(5)
    assert isinstance(tracker, CpuRNGStatesTracker)
    with tracker.fork():
        first = torch.rand(4)
        with tracker.fork(tensor_parallel.random.get_expert_parallel_rng_tracker_name()):
            expert = torch.rand(4)
        second = torch.rand(4)
    default = torch.rand(4)

    platform.model_parallel_manual_seed(5)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
        assert torch.equal(torch.rand(4), second)  # the nested fork did not consume this state
    assert torch.equal(torch.rand(4), default)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), default)  # forks leave the default generator alone
    assert not torch.equal(first, default) and not torch.equal(first, expert)


@on_cpu
def test_rng_tracker_survives_force_reset(mcore_world: None) -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.initialize_rng_tracker(force_reset=True)
    assert isinstance(tensor_parallel.get_cuda_rng_tracker(), CpuRNGStatesTracker)
    platform.model_parallel_manual_seed(5)


@on_cpu
def test_checkpoint_replays_dropout(mcore_world: None) -> None:
    """random.py:41,72 - tensor_parallel.checkpoint replays both dropout streams in backward."""
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def block(x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(x, 0.5)
        with tracker.fork():
            y = F.dropout(y, 0.5)
        return y * x

    results = []
    for recompute in (False, True):
        platform.model_parallel_manual_seed(7)
        x = torch.linspace(0.5, 1.5, 64, requires_grad=True)
        out = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        out.sum().backward()
        results.append((out.detach(), x.grad))
    (ref_out, ref_grad), (out, grad) = results
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert (ref_out == 0).any() and (ref_out != 0).any()


@on_cpu
def test_gpu_style_initialisation(mcore_world: None) -> None:
    """tensor_parallel/layers.py:261,597,873,1197 - weights allocated on the current device,
    drawn from the tracker's states: reproducible for a seed."""
    weights = []
    for _ in range(2):
        platform.model_parallel_manual_seed(3)
        model = h.tiny_gpt(h.tiny_config(use_cpu_initialization=False), seed=None)
        weights.append(model.decoder.layers[0].mlp.linear_fc1.weight.detach())
    assert weights[0].device == platform.get_device() and torch.equal(*weights)


@on_cpu
def test_no_pipelining_schedule(mcore_world: None) -> None:
    """schedules.py:596 - forward_backward_no_pipelining gives the plain losses and grads."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    platform.model_parallel_manual_seed(1)
    batches = h.make_batches(2, seed=4)
    model = h.tiny_gpt(h.tiny_config())
    ref_losses = []
    for batch in batches:
        loss = h.lm_loss(model, batch)
        (loss / len(batches)).backward()
        ref_losses.append(loss.detach())
    ref_grads = _grads(model)
    model.zero_grad()

    losses = get_forward_backward_func()(
        forward_step_func=h.forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=h.SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    torch.testing.assert_close(torch.stack([d["lm loss"] for d in losses]), torch.stack(ref_losses))
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


@on_cpu
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_ddp_and_optimizer_step(mcore_world: None, bf16: bool) -> None:
    """param_and_grad_buffer.py:806, optimizer.py:671/690/907, clip_grads.py:103/167 in one process."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    platform.model_parallel_manual_seed(1)
    config = h.tiny_config(bf16=bf16)
    module = h.tiny_gpt(config)
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=Float16Module(config, module) if bf16 else module,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e-3, bf16=bf16, params_dtype=config.params_dtype),
        [model],
    )
    model.zero_grad_buffer()
    h.lm_loss(model, h.make_batches(1)[0]).backward()
    finalize_model_grads([model])
    norm = torch.sqrt(sum(p.main_grad.double().pow(2).sum() for p in model.parameters())).item()
    before = [p.detach().float().clone() for p in model.parameters()]
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm == pytest.approx(norm, rel=1e-5)
    assert all(not torch.equal(p.detach().float(), b) for p, b in zip(model.parameters(), before) if p.ndim == 2)


@on_cpu
def test_dist_checkpointing_round_trip(mcore_world: None, tmp_path: Path) -> None:
    """filesystem_async.py:230, state_dict_saver.py:252 - save then load is bit-identical."""
    from megatron.core import dist_checkpointing

    platform.model_parallel_manual_seed(1)
    saved = h.tiny_gpt(h.tiny_config(), seed=0)
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    loaded = h.tiny_gpt(h.tiny_config(), seed=1)
    loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path)))
    for (name, a), b in zip(saved.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name


@on_cpu
def test_moe_metrics_tracker(mcore_world: None) -> None:
    """moe_utils.py:998 - aux-loss logging initialises its tracker on the compute device."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        track_moe_metrics,
    )

    totals: dict[str, torch.Tensor] = {}
    try:
        track_moe_metrics(
            loss_scale=1.0,
            iteration=1,
            total_loss_dict=totals,
            force_initialize=True,
            track_names=["test_platform_loss"],
            num_layers=2,
        )
        values = get_moe_layer_wise_logging_tracker()["test_platform_loss"]["values"]
        assert values.device == platform.get_device() and float(totals["test_platform_loss"]) == 0.0
    finally:
        get_moe_layer_wise_logging_tracker().pop("test_platform_loss", None)
        clear_aux_losses_tracker()
