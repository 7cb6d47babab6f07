"""Every adaptation that lets megatron-core run on a CPU with gloo, and nothing else.

Written for megatron-core 0.16.1 and checked on every supported release (``megatron_versions``); the
``file:line`` references are into 0.16.1's ``megatron/core/``. ``apply()`` runs them all once; it is
called by ``init_platform()`` and only when no GPU is used. Each adaptation is a small named function;
``applied()`` lists the ones in force. Two mechanisms do the work (see ``_cpu_shims.py``):

- ``bind_cpu_torch(module)``: that module's ``torch.cuda.current_device()`` is the CPU, its
  ``torch.cuda.synchronize``/streams/events are no-ops, its ``device="cuda"`` factory calls allocate
  on the CPU. Nothing outside the module is affected and there is no per-op cost.
- ``wrap_in_cuda_tensor_methods(owner, name)``: ``Tensor.type()`` reads ``torch.cuda.*`` and
  ``Tensor.cuda()`` is a no-op, only while that one function runs.

A megatron-core upgrade that moves or renames a target fails in ``apply()`` with the adaptation's
name; one that adds a new CUDA call fails in the component's test in tests/*/test_platform*.py.
"""

from __future__ import annotations

from collections.abc import Callable

import megatron.core

from moc_megatron.platform._cpu_shims import bind_cpu_torch, wrap_in_cuda_tensor_methods
from moc_megatron.platform.megatron_versions import check_supported

_ADAPTATIONS: list[Callable[[], None]] = []
_APPLIED: list[str] = []


def _adaptation(fn: Callable[[], None]) -> Callable[[], None]:
    _ADAPTATIONS.append(fn)
    return fn


@_adaptation
def tensor_parallel_layers() -> None:
    """Column/row-parallel layers and their collectives allocate on the CPU.

    tensor_parallel/layers.py:261,597,607,873,899,1197,1218 (weights when use_cpu_initialization is
    False), :552 (sequence-parallel reduce-scatter of the input gradient); tensor_parallel/mappings.py:91,141,148,181
    (gather/reduce-scatter along first dim), :442 (all_to_all); tensor_parallel/utils.py:70,91
    (split/gather 1d chunks for distribute_saved_activations).
    """
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel import utils as tp_utils

    for module in (layers, mappings, tp_utils):
        bind_cpu_torch(module)


@_adaptation
def tensor_parallel_broadcast_data() -> None:
    """``tensor_parallel.broadcast_data`` keeps batches on the CPU.

    tensor_parallel/data.py:37 (``device='cuda'``), :84 (``Tensor.cuda()``), :86 (current_device).
    """
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import data

    bind_cpu_torch(data)
    wrap_in_cuda_tensor_methods(data, "broadcast_data", tensor_parallel)


@_adaptation
def global_memory_buffer() -> None:
    """``GlobalMemoryBuffer.get_tensor`` (sequence-parallel all-gather buffer) allocates on the CPU.

    utils.py:631. Binding the view in megatron/core/utils.py also covers :1207 (``device="cuda"``).
    """
    from megatron.core import utils

    bind_cpu_torch(utils)


@_adaptation
def rng_tracker() -> None:
    """The RNG tracker keeps CPU generator states; recompute saves/restores the CPU generator.

    tensor_parallel/random.py:315 (``initialize_rng_tracker`` instantiates ``CudaRNGStatesTracker``:
    rebound to ``CpuRNGStatesTracker``), :235-238 (``add`` seeds a CUDA generator), :41 and :72
    (``_get_cuda_rng_state``/``_set_cuda_rng_state``, used by ``fork`` and by ``CheckpointFunction``
    for activation recompute), :422 (``model_parallel_cuda_manual_seed`` seeds the CUDA default
    generator: the CPU default generator here).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    from moc_megatron.platform.cpu_rng import CpuRNGStatesTracker, get_device_rng_state, set_device_rng_state

    for name in ("CudaRNGStatesTracker", "_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(mcore_random, name):
            raise RuntimeError(f"moc_megatron.platform: megatron.core.tensor_parallel.random.{name} is gone")
    bind_cpu_torch(mcore_random)
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = get_device_rng_state
    mcore_random._set_cuda_rng_state = set_device_rng_state
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        mcore_random.initialize_rng_tracker(force_reset=True)


@_adaptation
def rotary_embedding() -> None:
    """RoPE frequencies stay on the CPU.

    models/common/embeddings/rotary_pos_embedding.py:162 (``forward`` moves ``inv_freq`` to
    ``torch.cuda.current_device()`` on every call while it is on the CPU), :78 and :297.
    """
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    bind_cpu_torch(rotary_pos_embedding)


@_adaptation
def pipeline_schedules() -> None:
    """Pipeline schedules and point-to-point communication run on the CPU.

    pipeline_parallel/schedules.py:596,983,2138 (``total_num_tokens`` on ``device="cuda"`` in the
    no-pipelining, interleaved and 1F1B schedules); pipeline_parallel/p2p_communication.py:190-202
    (shape exchange), :313,:321 (receive buffers), :242,:398 (``torch.cuda.synchronize``).
    """
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    bind_cpu_torch(schedules)
    bind_cpu_torch(p2p_communication)


@_adaptation
def tied_embeddings_across_stages() -> None:
    """Tied input/output embeddings on the first and last pipeline stage are synchronised on the CPU.

    models/common/language_module/language_module.py:244 (``weight.data.cuda()`` in
    ``setup_embeddings_and_output_layer``, run when pipeline parallel and
    ``share_embeddings_and_output_weights``).
    """
    from megatron.core.models.common.language_module.language_module import LanguageModule

    wrap_in_cuda_tensor_methods(LanguageModule, "setup_embeddings_and_output_layer")


@_adaptation
def ddp_grad_buffers() -> None:
    """``DistributedDataParallel`` parameter and gradient buffers live on the CPU.

    distributed/param_and_grad_buffer.py:783,800,806 (buffers on current_device), :768
    (``device="cuda"``), :417,422,529 (communication stream).
    """
    from megatron.core.distributed import param_and_grad_buffer

    bind_cpu_torch(param_and_grad_buffer)


@_adaptation
def optimizer_buffers() -> None:
    """Megatron optimizers, gradient clipping and zero counting keep their scalars on the CPU.

    optimizer/optimizer.py:473,481,485,907 (``device='cuda'``), :1141; optimizer/clip_grads.py:90,103,
    115,174,207 (``device='cuda'``); optimizer/distrib_optimizer.py:791,1077 (current_device).
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as optimizer_module

    for module in (optimizer_module, clip_grads, distrib_optimizer):
        bind_cpu_torch(module)


@_adaptation
def optimizer_type_checks() -> None:
    """The optimizers' ``tensor.type() == 'torch.cuda.FloatTensor'`` checks accept CPU tensors.

    optimizer/optimizer.py:671,690 (``Float16OptimizerWithFloat16Params.__init__``);
    optimizer/distrib_optimizer.py:361,420 (``_build_model_and_main_param_groups``, called from
    ``__init__``), :582 (``DistributedOptimizer.__init__``); optimizer/clip_grads.py:167
    (``clip_grad_by_total_norm_fp32``, imported by name into optimizer/optimizer.py:50).
    """
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrap_in_cuda_tensor_methods(optimizer_module.Float16OptimizerWithFloat16Params, "__init__")
    wrap_in_cuda_tensor_methods(DistributedOptimizer, "__init__")
    wrap_in_cuda_tensor_methods(clip_grads, "clip_grad_by_total_norm_fp32", optimizer_module)


@_adaptation
def dist_checkpointing_save() -> None:
    """``dist_checkpointing.save`` (torch_dist strategy, also wrapped in
    ``FullyParallelSaveStrategyWrapper``) works on the CPU.

    dist_checkpointing/strategies/filesystem_async.py:230 (``torch.cuda.synchronize``);
    strategies/state_dict_saver.py:204,252 (result tensors on the CUDA device). Saving also needs
    ``psutil`` and a ``__main__`` guard in the entry script (filesystem_async.py:54 starts a spawn
    Manager). Loading works as shipped, except ``FullyParallelLoadStrategyWrapper``, which is not
    adapted (strategies/exchange_utils.py:98-110,326,336,499 allocate on CUDA).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    for module in (filesystem_async, state_dict_saver):
        bind_cpu_torch(module)


@_adaptation
def moe_metrics_tracker() -> None:
    """``track_moe_metrics(force_initialize=True)`` (aux-loss logging) allocates on the CPU.

    transformer/moe/moe_utils.py:998 (``device="cuda"``).
    """
    from megatron.core.transformer.moe import moe_utils

    bind_cpu_torch(moe_utils)


def apply() -> None:
    """Apply every CPU adaptation (idempotent). Only ``init_platform()`` should call this."""
    check_supported()
    for adaptation in _ADAPTATIONS:
        if adaptation.__name__ in _APPLIED:
            continue
        try:
            adaptation()
        except Exception as exc:
            raise RuntimeError(
                f"moc_megatron.platform: CPU adaptation '{adaptation.__name__}' failed for "
                f"megatron-core {megatron.core.__version__}: {exc}"
            ) from exc
        _APPLIED.append(adaptation.__name__)


def applied() -> tuple[str, ...]:
    """Names of the adaptations in force, in the order they were applied."""
    return tuple(_APPLIED)


def all_adaptations() -> tuple[str, ...]:
    """Names of every adaptation this module defines."""
    return tuple(fn.__name__ for fn in _ADAPTATIONS)
