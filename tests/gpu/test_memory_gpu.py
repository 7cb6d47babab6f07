"""On a GPU: the memory layer and the full model match the CPU path, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from moc_megatron.config import MoCConfig
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.platform import initialize_distributed

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def world():
    initialize_distributed()


def _config(**kw) -> MoCConfig:
    return MoCConfig(num_layers=2, hidden_size=128, num_attention_heads=4, moc_memory_layers=[0],
                     moc_num_chapters=33, moc_top_k=4, moc_chapter_size=16, moc_shared_bank=False,
                     use_cpu_initialization=True, **kw)


@pytest.mark.parametrize("unit", ["sequence", "chunk", "token"])
def test_memory_layer_cuda_matches_cpu(unit):
    torch.manual_seed(0)
    module = MoCMemoryAttention(_config(moc_routing_unit=unit, moc_chunk_size=16), layer_number=1)
    with torch.no_grad():
        module.linear_o.weight.normal_(0, 0.05)
    module.eval()
    hidden = torch.randn(64, 2, 128)
    want, _ = module(hidden)
    got, _ = module.cuda()(hidden.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_memory_layer_bf16_close_to_fp32():
    torch.manual_seed(0)
    module = MoCMemoryAttention(_config(), layer_number=1).cuda()
    with torch.no_grad():
        module.linear_o.weight.normal_(0, 0.05)
    module.eval()
    hidden = torch.randn(64, 2, 128, device="cuda")
    want, _ = module(hidden)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = module(hidden)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-3)


def test_model_trains_a_step_on_gpu_with_available_spec():
    from moc_megatron.model.moc_model import MoCGPTModel
    from moc_megatron.presets import get_preset

    preset = get_preset("moc-tiny")
    config = MoCConfig(**preset.config, use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16)
    model = MoCGPTModel(config, preset.vocab_size, 128).cuda()
    out_projections = [p for n, p in model.named_parameters() if n.endswith("cross_attention.linear_o.weight")]
    assert len(out_projections) == len(preset.config["moc_memory_layers"])
    with torch.no_grad():  # W_O starts at zero, which would give the bank an all-zero gradient
        for weight in out_projections:
            weight.normal_(0, 0.05)
    tokens = torch.randint(0, preset.vocab_size, (2, 128), device="cuda")
    position_ids = torch.arange(128, device="cuda").expand(2, 128)
    loss = model(tokens, position_ids, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("shared", "routed"):
        grad = getattr(model.memory_bank, name).grad
        assert grad is not None, f"memory_bank.{name} got no gradient"
        assert torch.isfinite(grad).all(), f"memory_bank.{name} has a non-finite gradient"
        assert grad.float().abs().sum() > 0, f"memory_bank.{name}'s gradient is all zero"
