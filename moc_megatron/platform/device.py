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

    On a GPU: select ``cuda:LOCAL_RANK``, nothing else. On a CPU: apply every adaptation in
    ``moc_megatron.platform.cpu_adapter`` (only then).
    """
    global _initialized
    if _initialized:
        return
    if using_gpu():
        torch.cuda.set_device(get_device())
    else:
        from moc_megatron.platform import cpu_adapter

        cpu_adapter.apply()
    _initialized = True


def pipeline_config_overrides() -> dict[str, object]:
    """``TransformerConfig`` fields this platform needs for megatron-core's pipeline schedules.

    Merge them into the config (``TransformerConfig(**fields, **pipeline_config_overrides())``) so
    the training code never asks which platform it runs on. Empty on a GPU.
    """
    if using_gpu():
        return {}
    # gloo has no batched (coalesced) send/recv; megatron's batch_isend_irecv path also
    # synchronises the device after every exchange (p2p_communication.py:398).
    return {"batch_p2p_comm": False}
