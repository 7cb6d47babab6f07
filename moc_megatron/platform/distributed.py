"""Process-group setup and seeding, the same calls on every platform.

megatron-core is imported inside the functions, so that ``from moc_megatron import platform`` stays
cheap for code that only needs the device.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from moc_megatron.platform.device import dist_backend, init_platform

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True if the torchrun/SLURM-style rendezvous variables are all set."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def restart_round() -> int:
    """torchrun's restart round (``TORCHELASTIC_RESTART_COUNT``; 0 on the first start and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def rendezvous_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store of this restart round, or ``None`` to let ``init_process_group`` use ``env://``.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) every round's workers connect as clients to
    the *same* TCPStore, which the agent keeps for the whole job, and torch 2.13's ``env://`` handler adds
    no per-round prefix. Every key of the first round (the default group's and each ``new_group``'s gloo
    addresses or NCCL unique ids) is still there after a restart, so a restarted rank reads a dead
    process's address and gloo's ``connectFullMesh`` fails with "Connection refused" (NCCL would hang or
    fail the same way). Prefixing the store with the round gives each round its own keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a fresh store for this launch (srun, a plain env:// launch)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/moc_megatron/round_{restart_round()}", store)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    timeout_minutes: int = 10,
    **kw: Any,
) -> None:
    """Initialise torch.distributed and megatron-core's model-parallel groups.

    Calls ``init_platform()``; joins the process group described by torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; under torchrun's agent store with keys
    of this restart round only, see :func:`rendezvous_store`), or creates a single-process world
    when not launched by torchrun; then calls ``parallel_state.initialize_model_parallel`` with the
    given sizes (``kw`` is passed on, e.g. ``expert_tensor_parallel_size``, ``order``).

    An existing process group is reused. Calling it again re-creates the model-parallel groups
    with the new sizes, so one process can try several layouts.
    """
    from megatron.core import parallel_state

    init_platform()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if launched_by_torchrun():
            store = rendezvous_store(timeout)
            if store is None:
                dist.init_process_group(backend=dist_backend(), timeout=timeout)
            else:
                dist.init_process_group(backend=dist_backend(), store=store, rank=int(os.environ["RANK"]),
                                        world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            # A world of one needs no rendezvous: an in-process store avoids picking a free port
            # (which races with other test processes on the same machine).
            dist.init_process_group(
                backend=dist_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        **kw,
    )


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch's default generator and megatron-core's RNG tracker.

    Calls megatron-core's ``tensor_parallel.model_parallel_cuda_manual_seed(seed)`` on every
    platform: it registers the 'data-parallel-rng', 'model-parallel-rng' (seed + 2718 + tp_rank) and
    'expert-parallel-rng' states under megatron-core's tracker names, so
    ``get_cuda_rng_tracker().fork()`` (dropout in tensor-parallel regions, weight initialisation)
    and ``tensor_parallel.checkpoint`` (activation recompute) work. On a CPU the tracker holds CPU
    generator states (see ``cpu_rng.py``). Needs the model-parallel groups to exist.
    """
    from megatron.core import tensor_parallel

    init_platform()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron-core's model-parallel state and the process group (for tests and scripts)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
