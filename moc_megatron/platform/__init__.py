"""The one place that knows which platform (GPU or CPU) this process runs on.

On a GPU it selects the device and uses NCCL; on a CPU it uses gloo and adapts the parts of
megatron-core that hard-code CUDA (``cpu_adapter.py``). Code elsewhere calls these functions and
never asks which platform it runs on:

    from moc_megatron import platform
    platform.initialize_distributed(tensor_model_parallel_size=2)
    platform.model_parallel_manual_seed(1234)
    config = TransformerConfig(**{**fields, **platform.transformer_config_overrides()})
    batch = batch.to(platform.get_device())

``optimizer_state.py`` adapts megatron-core's optimizer checkpointing to a build without Transformer
Engine/Apex (every CPU, and a GPU without them); ``training/checkpointing.py`` calls it.
"""

from moc_megatron.platform.device import (
    dist_backend,
    get_device,
    init_platform,
    pin_memory,
    transformer_config_overrides,
    using_gpu,
    weights_on_cpu,
)
from moc_megatron.platform.distributed import (
    destroy_distributed,
    initialize_distributed,
    model_parallel_manual_seed,
)

__all__ = [
    "destroy_distributed",
    "dist_backend",
    "get_device",
    "init_platform",
    "initialize_distributed",
    "model_parallel_manual_seed",
    "pin_memory",
    "transformer_config_overrides",
    "using_gpu",
    "weights_on_cpu",
]
