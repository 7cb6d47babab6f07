"""Tiny Megatron MoC checkpoints with random weights, for the Hugging Face export/import tests."""

from __future__ import annotations

import os

import torch

from moc_megatron.checkpoint import layout
from moc_megatron.checkpoint.weights import save_weights_checkpoint
from moc_megatron.model.builder import build_model
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.config_from_args import run_model_settings

VOCAB = 128
BASE = [
    "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--seq-length", "32", "--vocab-size", str(VOCAB), "--mock-data", "--micro-batch-size", "1",
    "--train-iters", "1", "--lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--rotary-base", "50000", "--norm-epsilon", "1e-6",
    "--moc-memory-layers", "0", "2", "--moc-num-chapters", "9", "--moc-chapter-size", "4", "--moc-top-k", "2",
    "--moc-num-heads", "4", "--moc-num-query-groups", "2", "--moc-chunk-size", "4",
]


def megatron_model(flags: list[str], seed: int = 0):
    """A MoC model built as training builds it, every parameter random (W_O included); and its run."""
    run = parse_run_config([*BASE, *flags], world_size=1, exit_on_error=False)
    config = run.model
    settings = run_model_settings(run)
    model = build_model(config, settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    model.eval()
    return model, run, config, settings


def save_checkpoint(root: str, model, run, config, settings) -> str:
    """``root/iter_0000000`` + tracker, as the importer writes it; returns ``root``."""
    path = layout.checkpoint_path(root, 0)
    os.makedirs(path)
    save_weights_checkpoint({"model": model.sharded_state_dict()}, config, settings, path, run.saved_args)
    layout.write_tracker(root, 0)
    return root


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, vocab]`` logits of the Megatron model."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


# The memory a dense import adds in the tests: one memory layer, chunk routing.
MEMORY_FLAGS = ["--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
                "--moc-routing-unit", "chunk", "--moc-chunk-size", "4"]


def load_hf(folder: str, impl: str = "sdpa"):
    """An exported folder as transformers loads it (``trust_remote_code``), in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                             attn_implementation=impl).eval()


def tiny_hf_model(cls, config, folder: str, seed: int = 0):
    """A tiny random model built by transformers itself (``cls(config)``), every parameter perturbed (norms and
    biases too), saved to ``folder``; returned in eval mode."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


def load_megatron_checkpoint(root: str):
    """The Megatron model of a saved checkpoint (``root`` with its tracker), fp32, eval mode."""
    from megatron.core import dist_checkpointing

    from moc_megatron.eval.models import build_megatron_model, resolve_checkpoint, saved_common_state

    path, _ = resolve_checkpoint(root)
    model = build_megatron_model(saved_common_state(path), path)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)
    return model.float().eval()


def shard_bytes(folder: str) -> dict[str, bytes]:
    """``{file name: bytes}`` of the safetensors shards of an exported folder."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if f.endswith(".safetensors")}
