"""megatron-core's RNG tracker on a CPU.

On a GPU megatron-core keeps two kinds of generators apart: the CPU generator and the CUDA generator,
whose state the tracker swaps for named states ('model-parallel-rng', 'expert-parallel-rng',
'data-parallel-rng') around dropout in tensor-parallel regions and weight initialisation. On a CPU
every random op draws from the CPU default generator, so that generator plays the part of the CUDA
generator here: the tracker swaps *its* state, and megatron-core's ``_get_cuda_rng_state`` /
``_set_cuda_rng_state`` (used by activation recompute to replay dropout) read and write it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mcore_random


def get_device_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement of ``megatron.core.tensor_parallel.random._get_cuda_rng_state``."""
    return torch.get_rng_state()


def set_device_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement of ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's ``CudaRNGStatesTracker`` whose named states are CPU generator states.

    Same names, seeds, bookkeeping and nesting rules as the original; ``add`` seeds a fresh CPU
    generator instead of the CUDA one and ``fork`` swaps the CPU default generator's state (without
    the original's "CPU RNG state changed within GPU RNG context" warning, which on a CPU would fire
    on every forked dropout).
    """

    def add(self, name: str, seed: int) -> None:
        """Track a new named RNG state seeded with ``seed``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Draw from the named state inside the block, then restore the outer state."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the desired "
                    f"state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name
