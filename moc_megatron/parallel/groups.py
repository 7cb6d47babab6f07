"""The process groups a memory layer and its bank use, from megatron-core's ``pg_collection``.

megatron-core passes a ``ProcessGroupCollection`` down the model (``GPTModel`` -> ``TransformerBlock`` ->
``TransformerLayer`` -> its ``cross_attention``, our memory read). Modules take their groups from it; only
when none arrives (a module built on its own, or a megatron-core without ``process_groups_config``) are
they read from the global ``parallel_state``, and with no model parallelism initialised a module runs
as a single rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state

try:  # megatron-core >= 0.14
    from megatron.core.process_groups_config import ProcessGroupCollection
except ImportError:  # pragma: no cover - older megatron-core: parallel_state only
    ProcessGroupCollection = None

MEMORY_GROUPS = ("tp", "ep", "dp_cp", "expt_dp")
"""The ``ProcessGroupCollection`` fields memory layers and banks read."""


@dataclass(frozen=True)
class MemoryGroups:
    """Process groups (``None`` where the dimension is 1 or nothing is initialised) and this rank's place."""

    tp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    dp_cp: dist.ProcessGroup | None = None
    expt_dp: dist.ProcessGroup | None = None

    @staticmethod
    def _rank(group: dist.ProcessGroup | None) -> int:
        return 0 if group is None or not dist.is_initialized() else dist.get_rank(group)

    @staticmethod
    def _size(group: dist.ProcessGroup | None) -> int:
        return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)

    @property
    def tp_size(self) -> int:
        """Tensor-parallel size."""
        return self._size(self.tp)

    @property
    def tp_rank(self) -> int:
        """Rank in the tensor-parallel group."""
        return self._rank(self.tp)

    @property
    def ep_size(self) -> int:
        """Expert-model-parallel size (ranks the routed chapters are split over)."""
        return self._size(self.ep)

    @property
    def ep_rank(self) -> int:
        """Rank in the expert-model-parallel group."""
        return self._rank(self.ep)

    @property
    def dp_rank(self) -> int:
        """Rank in the data-parallel group (with context parallelism)."""
        return self._rank(self.dp_cp)

    @property
    def edp_rank(self) -> int:
        """Rank in the expert-data-parallel group."""
        return self._rank(self.expt_dp)


def memory_groups(pg_collection=None) -> MemoryGroups:
    """The groups of ``pg_collection`` (a megatron ``ProcessGroupCollection``), else of ``parallel_state``."""
    if pg_collection is not None:
        return MemoryGroups(**{name: getattr(pg_collection, name, None) for name in MEMORY_GROUPS})
    if not parallel_state.model_parallel_is_initialized():
        return MemoryGroups()
    if ProcessGroupCollection is not None:
        return memory_groups(ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(MEMORY_GROUPS)))
    return MemoryGroups(  # pragma: no cover - megatron-core without process_groups_config
        tp=parallel_state.get_tensor_model_parallel_group(),
        ep=parallel_state.get_expert_model_parallel_group(),
        dp_cp=parallel_state.get_data_parallel_group(with_context_parallel=True),
        expt_dp=parallel_state.get_expert_data_parallel_group(),
    )
