"""Parameter and FLOP accounting against the paper's published numbers.

Sources, all in the paper's PDF (idea/Mixture_of_Chapters_ICLR_Workshop_Paper.pdf of the paper's code,
arXiv 2603.21096):
- Table 4 ("Per-sequence FLOPs for one forward pass and one forward+backward pass (B = 1, L = 1024)"):
  the three models' forward, backward and forward+backward FLOPs, in TFLOPs to three decimals.
- Appendix A.2 ("Analytic FLOPs calculation"), equations (5)-(27) and the "Model totals" paragraph: the
  exact per-layer terms and model totals that Table 4 rounds.
- Appendix A.4.1 ("Model sizes"): parameter counts in millions to two decimals.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from moc_megatron.model import flops, model_report
from moc_megatron.presets import get_preset

pytestmark = pytest.mark.usefixtures("mcore_world")

L = 1024
PAPER_MODELS = ("dense-paper-backbone", "dense-paper-iso", "moc-paper")

# Table 4: (forward, backward, forward+backward) in TFLOPs per sequence.
TABLE_4_TFLOPS = {
    "dense-paper-backbone": (0.356, 0.713, 1.069),  # "Vanilla (backbone-only)"
    "dense-paper-iso": (0.496, 0.992, 1.487),  # "Vanilla (iso-FLOP)"
    "moc-paper": (0.459, 0.918, 1.378),  # "Mixture of Chapters (MoC)"
}

# Appendix A.2, "Model totals": exact forward FLOPs per sequence.
A2_FORWARD = {
    "dense-paper-backbone": 356_363_685_888,  # 16 * 17,424,982,016 + 77,563,973,632
    "dense-paper-iso": 495_763_542_016,  # 24 * 17,424,982,016 + 77,563,973,632
    "moc-paper": 459_171_802_488,  # 12 * 17,424,982,016 + 4 * 43,127,011,166 + 77,563,973,632
}

# Appendix A.4.1: parameters in millions, two decimals.
A41_DENSE_ISO_M = 202.94  # "the dense baseline has 202.94M parameters"
A41_MOC_TOTAL_M = 371.29  # "the memory model has 371.29M total parameters"
A41_MOC_BACKBONE_M = 147.87  # "composed of a 147.87M backbone"
A41_MOC_BANK_M = 201.38  # "plus a 201.38M bank"
A41_MOC_MEMORY_LAYERS_M = 22.04  # "and 22.04M memory-layer parameters"

# Per memory layer our model holds 767 parameters more than the paper's: its router scores the 4096 routed
# chapters (the paper's scores all 4097 and masks the shared one: -768 weights, -1 bias), and its shared and
# routed memory RMSNorms have learnable weights (the paper's normalise without a weight: +2 * 768).
OUR_EXTRA_PER_MEMORY_LAYER = -768 - 1 + 2 * 768


def paper_config(name: str):
    return model_report.preset_config(get_preset(name))


@pytest.fixture(scope="module")
def estimates():
    return {name: model_report.estimate_preset(name) for name in (*PAPER_MODELS, "moc-tiny")}


def tera(n: int) -> float:
    return round(n / 1e12, 3)


def millions(n: int) -> float:
    return round(n / 1e6, 2)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_table_4_flops(estimates, name):
    """Table 4: forward, backward and forward+backward TFLOPs of the three models."""
    count = estimates[name].flops
    assert (tera(count.forward), tera(count.backward), tera(count.forward_backward)) == TABLE_4_TFLOPS[name]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_appendix_a2_forward_totals_exact(name):
    """Appendix A.2 "Model totals", to the FLOP, with the paper code's router convention."""
    count = flops.estimate_flops(paper_config(name), 49152, L, paper_convention=True)
    assert count.forward == A2_FORWARD[name]
    assert count.forward_backward == 3 * A2_FORWARD[name]


def test_dense_models_do_not_depend_on_router_convention(estimates):
    for name in ("dense-paper-backbone", "dense-paper-iso"):
        assert estimates[name].flops.forward == A2_FORWARD[name]


def test_appendix_a2_standard_layer_terms():
    """Appendix A.2, "Standard transformer layer": equations (5)-(13) and their sums."""
    parts = flops.standard_layer_flops(paper_config("dense-paper-backbone"), L)
    assert parts == {
        "self_attention": 6_530_531_328,
        "rope": 3_145_728,
        "mlp": 10_883_432_448,
        "norms": 6_299_648,
        "residuals": 1_572_864,
    }
    assert sum(parts.values()) == 17_424_982_016


def test_appendix_a2_memory_layer_terms():
    """Appendix A.2, "MoC memory layer": equations (14)-(24) and the extra norm and residual."""
    config = paper_config("moc-paper")
    assert flops.memory_tokens_selected(config) == 4160
    paper = flops.memory_layer_extra_flops(config, L, paper_convention=True)
    assert paper == {
        "router": 7_124_491,  # (14)-(17)
        "router_losses": 331_859,
        "memory_preprocess": 15_991_040,  # (18)-(19)
        "memory_attention": 25_674_645_504,  # (20)-(24) and the softmax term
        "norms": 3_149_824,
        "residuals": 786_432,
    }
    assert sum(paper.values()) == 25_702_029_150
    # Our router: 4096 routed outputs instead of 4097, and only the load-balancing and z-losses.
    ours = flops.memory_layer_extra_flops(config, L)
    assert ours["router"] == paper["router"] - 2 * 768 - 5 - 6
    assert ours["router_losses"] == 64 + 2 * 4096 + 5 * 4096 + 2
    assert {k: v for k, v in ours.items() if not k.startswith("router")} == {
        k: v for k, v in paper.items() if not k.startswith("router")
    }


def test_appendix_a2_head_terms():
    """Appendix A.2, "Final prediction head and loss": equations (25)-(27)."""
    assert flops.head_flops(paper_config("moc-paper"), 49152, L) == {
        "norms": 3_149_824,
        "lm_head": 77_309_411_328,
        "loss": 251_412_480,
    }


def test_our_router_convention_differs_from_the_paper_by_a_millionth(estimates):
    ours, paper = estimates["moc-paper"].flops, estimates["moc-paper"].paper_flops
    assert paper.forward == A2_FORWARD["moc-paper"]
    assert 0 < paper.forward - ours.forward < 1e-5 * paper.forward


def test_appendix_a41_parameters(estimates):
    """Appendix A.4.1 model sizes; our memory layers differ from the paper's by 767 parameters each."""
    dense = estimates["dense-paper-iso"].parameters
    assert millions(dense.total) == A41_DENSE_ISO_M
    moc = estimates["moc-paper"].parameters
    assert millions(moc.backbone) == A41_MOC_BACKBONE_M
    assert millions(moc.bank) == A41_MOC_BANK_M
    assert moc.bank == 262_208 * 768
    extra = 4 * OUR_EXTRA_PER_MEMORY_LAYER
    assert moc.memory_layers == 22_045_696
    assert millions(moc.memory_layers - extra) == A41_MOC_MEMORY_LAYERS_M
    assert millions(moc.total - extra) == A41_MOC_TOTAL_M
    assert moc.total == moc.backbone + moc.bank + moc.memory_layers
    # The backbone-only baseline is the MoC model's backbone.
    assert estimates["dense-paper-backbone"].parameters.total == moc.backbone


def test_tied_embeddings_counted_once(estimates):
    tiny = estimates["moc-tiny"]
    model = model_report.build_meta_model(get_preset("moc-tiny"))
    embedding = model.embedding.word_embeddings.weight.numel()
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert tiny.parameters.total == sum(p.numel() for p in model.parameters())
    if model.output_layer.weight is not None:  # a tied output layer may hold a reference to the embedding
        assert naive == tiny.parameters.total + embedding
    assert tiny.parameters.backbone >= embedding


def test_paper_size_model_builds_on_meta_quickly():
    start = time.perf_counter()
    model = model_report.build_meta_model(get_preset("moc-paper"))
    assert time.perf_counter() - start < 30  # about 0.05 s on a 2-core dev machine
    assert all(p.is_meta for p in model.parameters())
    assert model.memory_bank.routed.shape == (4096, 64, 768)


def test_flops_scale_with_sequence_length():
    config = paper_config("moc-paper")
    short, long = flops.estimate_flops(config, 49152, 512), flops.estimate_flops(config, 49152, 1024)
    # Token-wise terms double, self-attention scores quadruple, memory K/V projections stay the same.
    assert 1.9 * short.forward < long.forward < 2.5 * short.forward
    assert long.backward == 2 * long.forward
    assert len(long.layers) == 16 and long.layers[2] > long.layers[0]


def test_causal_routing_units_bound_projected_memory():
    config = model_report.preset_config(get_preset("moc-paper"), moc_routing_unit="token")
    assert flops.routing_units(config, L) == L
    assert flops.memory_tokens_projected(config, L) == 4097 * 64  # every chapter may get traffic
    chunk = model_report.preset_config(get_preset("moc-paper"), moc_routing_unit="chunk", moc_chunk_size=256)
    assert flops.routing_units(chunk, L) == 4
    assert flops.memory_tokens_projected(chunk, L) == (1 + 4 * 64) * 64


def test_chapters_are_counted_once_per_micro_batch_and_documents_route_once_each():
    token = model_report.preset_config(get_preset("moc-tiny"), moc_routing_unit="token")
    L, c, t = 128, token.moc_num_chapters, token.moc_chapter_size
    # One sequence of 128 tokens at top-k may touch every chapter; 16 sequences share one projection.
    assert flops.memory_tokens_projected(token, L, micro_batch_size=1) == c * t
    assert flops.memory_tokens_projected(token, L, micro_batch_size=16) == round(c * t / 16)
    one, many = (flops.estimate_flops(token, 2048, L, micro_batch_size=b).forward for b in (1, 16))
    assert many < one
    sequence = model_report.preset_config(get_preset("moc-tiny"), moc_routing_unit="sequence")
    document = model_report.preset_config(get_preset("moc-tiny"), moc_routing_unit="document", moc_chunk_size=L)
    # One document per sequence, read in one piece, is sequence routing; three documents route three times.
    assert flops.estimate_flops(document, 2048, L).forward == flops.estimate_flops(sequence, 2048, L).forward
    assert flops.routing_units(document, L, documents=3) == 3
    three = flops.estimate_flops(document, 2048, L, documents=3).forward
    assert three > flops.estimate_flops(document, 2048, L).forward
    chunk = model_report.preset_config(get_preset("moc-tiny"), moc_routing_unit="chunk", moc_chunk_size=16)
    separated = model_report.preset_config(get_preset("moc-tiny"), moc_routing_unit="chunk", moc_chunk_size=16,
                                    reset_attention_mask=True)
    assert flops.routing_units(chunk, L, documents=3) == 8 and flops.routing_units(separated, L, documents=3) == 10


def test_tool_json_and_text(run_tool, capsys):
    assert run_tool("estimate_flops", "--preset", "moc-tiny", "--seq-length", "128", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seq_length"] == 128
    assert summary["parameters"]["total"] == sum(
        summary["parameters"][k] for k in ("backbone", "bank", "memory_layers")
    )
    fwd = summary["flops_per_sequence"]
    assert fwd["forward_backward"] == 3 * fwd["forward"] == 3 * sum(fwd["components"].values())
    assert run_tool("estimate_flops", "--preset", "dense-paper-backbone") == 0
    text = capsys.readouterr().out
    assert "356,363,685,888" in text and "147,874,560" in text


def test_meta_build_leaves_default_device_alone():
    model_report.build_meta_model(get_preset("moc-tiny"))
    assert torch.empty(1).device.type == "cpu"
