"""Checkpoints saved by multi-process (gloo) runs at TP=2, PP=2 (with and without virtual stages) and
EP=2 export to exactly the same Hugging Face files as the single-process checkpoint they hold."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from launch import run_distributed  # noqa: E402

from moc_megatron.platform.megatron_versions import read_common_state  # noqa: E402

UNIT = str(Path(__file__).resolve().parents[1] / "unit")
FOUR_LAYERS = ["--num-layers", "4", "--moc-memory-layers", "0", "3", "--moc-routing-unit", "chunk"]
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"],  # vocabulary stays 128
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                 "--global-batch-size", "2"],
    "ep2": ["--expert-model-parallel-size", "2"],
}


def _resave_worker() -> None:
    """Load the single-process checkpoint at this layout and save it again from every rank."""
    sys.path.insert(0, os.environ["HF_UNIT_DIR"])
    import hf_helpers as H
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from moc_megatron import platform
    from moc_megatron.checkpoint import layout as meta
    from moc_megatron.checkpoint.weights import save_weights_checkpoint
    from moc_megatron.model.builder import build_model_chunks
    from moc_megatron.training.arguments import parse_run_config
    from moc_megatron.training.config_from_args import run_model_settings

    flags = json.loads(os.environ["HF_LAYOUT_FLAGS"])
    run = parse_run_config([*H.BASE, *FOUR_LAYERS, *flags], exit_on_error=False)
    platform.initialize_distributed(
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=run.parallel.expert_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.parallel.virtual_pipeline_model_parallel_size,
    )
    config, settings = run.model, run_model_settings(run)
    chunks = build_model_chunks(config, settings)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    state = {k: c.sharded_state_dict() for k, c in zip(keys, chunks)}
    loaded = dist_checkpointing.load(state, meta.checkpoint_path(os.environ["HF_SRC"], 0))
    for k, c in zip(keys, chunks):
        c.load_state_dict(loaded[k], strict=True)
    dst = os.environ["HF_DST"]
    if dist.get_rank() == 0:
        os.makedirs(meta.checkpoint_path(dst, 0))
    dist.barrier()
    save_weights_checkpoint({k: c.sharded_state_dict() for k, c in zip(keys, chunks)}, config, settings,
                            meta.checkpoint_path(dst, 0), run.saved_args)
    dist.barrier()
    if dist.get_rank() == 0:
        meta.write_tracker(dst, 0)
    platform.destroy_distributed()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    sys.path.insert(0, UNIT)
    import hf_helpers as H

    from moc_megatron import platform

    platform.initialize_distributed()

    from moc_megatron.hf.export import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("hf_layouts")
    model, args, config, settings = H.megatron_model(FOUR_LAYERS, seed=7)
    H.save_checkpoint(str(root / "ckpt"), model, args, config, settings)
    export_checkpoint(ExportOptions(load=str(root / "ckpt"), output=str(root / "hf"), max_shard_size="40KB"),
                      log=lambda *a: None)
    return root


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".safetensors"}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_saved_at_layout_exports_identically(single_process, tmp_path, layout):
    from moc_megatron.hf.export import ExportOptions, export_checkpoint

    dst = tmp_path / "ckpt"
    run_distributed(_resave_worker, nprocs=2, timeout=180, env={
        "HF_UNIT_DIR": UNIT, "HF_SRC": str(single_process / "ckpt"), "HF_DST": str(dst),
        "HF_LAYOUT_FLAGS": json.dumps(LAYOUTS[layout])})
    common = read_common_state(str(dst / "iter_0000000"))
    assert common["parallel_layout"]["tp"] * common["parallel_layout"]["pp"] * common["parallel_layout"]["ep"] == 2
    export_checkpoint(ExportOptions(load=str(dst), output=str(tmp_path / "hf"), max_shard_size="40KB"),
                      log=lambda *a: None)
    assert _shards(tmp_path / "hf") == _shards(single_process / "hf")
