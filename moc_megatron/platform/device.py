"""Which platform this process runs on, and the one-time setup for it."""

from __future__ import annotations

import os

import torch

_FORCE_CPU_ENV = "MOC_FORCE_CPU"
_initialized = False


def using_gpu() -> bool:
    """True if CUDA is available and not switched off with ``MOC_FORCE_CPU=1``."""
    forced_cpu = os.environ.get(_FORCE_CPU_ENV, "").strip().lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` as set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_device() -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` on a GPU, else the CPU."""
    if using_gpu():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def dist_backend() -> str:
    """The ``torch.distributed`` backend for this platform: ``"nccl"`` on a GPU, else ``"gloo"``."""
    return "nccl" if using_gpu() else "gloo"


def init_platform() -> None:
    """Prepare this process for megatron-core (idempotent).

    On every platform: the megatron-core version adaptations (``megatron_versions``). On a GPU: select
    ``cuda:LOCAL_RANK``, nothing else. On a CPU: apply every adaptation in
    ``moc_megatron.platform.cpu_adapter`` (only then).
    """
    global _initialized
    if _initialized:
        return
    from moc_megatron.platform.megatron_versions import (
        adapt_common_state_loading,
        check_supported,
        quiet_internal_notices,
    )

    check_supported()
    adapt_common_state_loading()
    quiet_internal_notices()
    if using_gpu():
        torch.cuda.set_device(get_device())
    else:
        from moc_megatron.platform.cpu_adapter import apply

        apply()
    _initialized = True


def transformer_config_overrides() -> dict[str, object]:
    """``TransformerConfig`` fields this platform must force, to merge over the training config.

    ``TransformerConfig(**{**fields, **platform.transformer_config_overrides()})`` lets the training code
    enable CUDA-only fusions without asking which platform it runs on. Empty on a GPU; on a CPU it
    switches off the fusions that need CUDA extensions (they raise at model construction without
    them). megatron-core's pipeline schedules need no override on gloo: batched p2p
    (``batch_p2p_comm=True``, the default) works once ``torch.cuda.synchronize`` is adapted.
    """
    if using_gpu():
        return {}
    return {
        "gradient_accumulation_fusion": False,  # fused_weight_gradient_mlp_cuda (tensor_parallel/layers.py)
        "apply_rope_fusion": False,  # Transformer Engine fused RoPE
        "persist_layer_norm": False,  # Apex persistent LayerNorm kernel
    }


def weights_on_cpu(requested: bool) -> bool:
    """``TransformerConfig.use_cpu_initialization``: as ``requested`` (``--use-cpu-initialization``) on a
    GPU; always on a CPU, where the weights live."""
    return requested or not using_gpu()


def pin_memory() -> bool:
    """Whether data loaders pin host memory: only when batches go to a GPU."""
    return using_gpu()
