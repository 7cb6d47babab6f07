"""pretrain_moc.py with ``--moc-routing-unit document --reset-attention-mask --reset-position-ids``: the batches
carry document ids, the memory routes documents, and the checkpoint resumes, exports and imports."""

from __future__ import annotations

import json
import shutil

import hf_helpers as H
import pytest
import torch
from megatron.core.datasets import gpt_dataset

from moc_megatron.hf.export import ExportOptions, export_checkpoint
from moc_megatron.hf.importer import ImportOptions, import_checkpoint
from moc_megatron.memory import documents
from moc_megatron.memory.documents import document_ids_from_tokens
from moc_megatron.training.arguments import parse_args, parse_run_config
from moc_megatron.training.loop import pretrain
from moc_megatron.training.validate_args import ArgumentsError

FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu", "--normalization",
    "RMSNorm", "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "128", "--mock-data",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-3", "--min-lr", "5e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
    "--num-workers", "0", "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4",
    "--moc-top-k", "2", "--moc-chunk-size", "8", "--moc-routing-unit", "document", "--reset-attention-mask",
    "--reset-position-ids", "--train-iters", "4",
]
quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-iteration run on mock documents of 1-11 tokens (several per window) saved at 2 and 4, and the same
    run resumed from its iteration-2 checkpoint (a copy)."""
    root = tmp_path_factory.mktemp("documents")
    layouts: list = []
    build = documents.DocumentUnits.build

    def counting(*args, **kwargs):
        layout = build(*args, **kwargs)
        layouts.append(layout)
        return layout

    patch = pytest.MonkeyPatch()
    patch.setattr(gpt_dataset.MockGPTLowLevelDataset, "max_sequence_length", 12)
    patch.setattr(documents.DocumentUnits, "build", staticmethod(counting))
    try:
        first = pretrain(parse_run_config([*FLAGS, "--save", str(root / "ckpt"), "--save-interval", "2"],
                                          world_size=1, exit_on_error=False))
        shutil.copytree(root / "ckpt" / "iter_0000002", root / "resume" / "iter_0000002")
        (root / "resume" / "latest_checkpointed_iteration.txt").write_text("2")
        resumed = pretrain(parse_run_config([*FLAGS, "--load", str(root / "resume"), "--save", str(root / "resume"),
                                             "--save-interval", "2"], world_size=1, exit_on_error=False))
    finally:
        patch.undo()
    return root, first, resumed, layouts


def test_training_routes_documents_and_resumes(trained):
    root, first, resumed, layouts = trained
    assert first.iteration == 4 and resumed.start_iteration == 2 and resumed.iteration == 4
    assert (root / "resume" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for i in (3, 4):  # the resumed run continues the uninterrupted one exactly
        assert resumed.lm_losses[i] == pytest.approx(first.lm_losses[i], rel=1e-6)
    # Every micro-batch of the memory layer was cut into documents, several per 32-token window.
    assert layouts and all(layout.unit == "document" for layout in layouts)
    assert max(layout.num_units for layout in layouts) > 2 * 2


def test_the_trained_checkpoint_exports_and_imports_with_its_routing(trained, tmp_path):
    root = trained[0]
    export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(tmp_path / "hf")), log=quiet)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["routing_unit"], config["reset_attention_mask"]) == ("document", True)
    model = H.load_megatron_checkpoint(str(root / "ckpt"))
    hf = H.load_hf(str(tmp_path / "hf"))
    tokens = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    tokens[0, [3, 4, 15]] = config["document_separator_id"]
    with torch.no_grad():
        want = model(tokens, torch.arange(24).expand(2, 24), None,
                     document_ids=document_ids_from_tokens(tokens, config["document_separator_id"]))
        got = hf(tokens).logits
    assert (got - want[..., : got.shape[-1]]).abs().max() <= 1e-4
    import_checkpoint(ImportOptions(hf=str(tmp_path / "hf"), save=str(tmp_path / "back")), log=quiet)
    back = H.load_megatron_checkpoint(str(tmp_path / "back"))
    assert back.config.moc_routing_unit == "document" and back.config.reset_attention_mask


def test_reset_position_ids_needs_reset_attention_mask():
    flags = [f for f in FLAGS if f != "--reset-attention-mask"]
    with pytest.raises(ArgumentsError, match="--reset-position-ids needs --reset-attention-mask"):
        parse_args(flags, world_size=1, exit_on_error=False)
