"""On a GPU: the moc-tiny model's forward and backward on whichever megatron-core is installed.

``scripts/gpu_check.sh`` runs this file once per megatron-core it brought along (0.16.1, the pinned
development version, and the newest, 0.19.2) through ``PYTHONPATH``; ``MOC_EXPECT_MEGATRON_CORE`` names the
version that must be the one imported, so the summary cannot report a version that did not run. Skipped
without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_imported_megatron_core_is_the_expected_one():
    import megatron.core

    version = getattr(megatron.core, "__version__", None)
    print(f"megatron-core {version} from {os.path.dirname(megatron.core.__file__)}")
    expected = os.environ.get("MOC_EXPECT_MEGATRON_CORE")
    if expected:
        assert version == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moc_tiny_forward_backward_on_cuda(dtype):
    from moc_megatron.config import MoCConfig
    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.platform import initialize_distributed
    from moc_megatron.platform.distributed import model_parallel_manual_seed
    from moc_megatron.presets import get_preset

    initialize_distributed()
    model_parallel_manual_seed(0)
    preset = get_preset("moc-tiny")
    config = MoCConfig(**preset.config, use_cpu_initialization=True, bf16=dtype == torch.bfloat16,
                       params_dtype=dtype)
    model = MoCGPTModel(config, preset.vocab_size, 128).cuda()
    memory = [m for m in model.modules() if hasattr(m, "router")]
    with torch.no_grad():  # W_O starts at zero (a new memory layer is an identity): open the memory path
        for m in memory:
            m.linear_o.weight.normal_(0, 0.02)
    tokens = torch.randint(0, preset.vocab_size, (2, 128), device="cuda")
    position_ids = torch.arange(128, device="cuda").expand(2, 128)
    loss = model(tokens, position_ids, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss) and 5 < loss.item() < 12  # about log(4096) = 8.3 at initialisation
    bank = model.memory_bank.routed
    grad = bank.main_grad if getattr(bank, "main_grad", None) is not None else bank.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert memory and all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in memory)
