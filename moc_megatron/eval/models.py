"""Models to evaluate, behind one interface: a Megatron checkpoint or a Hugging Face model folder.

:func:`load_megatron` rebuilds the model a ``pretrain_moc.py``/``finetune_moc.py`` checkpoint was trained
as, from the arguments and model signature saved in it, in this one process on the CPU (any TP/PP/EP
layout it was saved at: ``torch_dist`` stores global tensors), and loads its weights. MoC and dense
(no memory layers) checkpoints alike. :func:`load_hf` loads a folder with transformers'
``AutoModelForCausalLM`` (``trust_remote_code=True``, for the exported ``modeling_moc.py``).

Both return an :class:`EvalModel`, whose ``logits`` is the :data:`~moc_megatron.eval.scoring.LogitsFn`
the scorers take.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer

# Saved flags that describe the training run's layout or runtime; evaluation runs in one process.
_SINGLE_PROCESS = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, sequence_parallel=False, recompute_granularity=None,
    recompute_method=None, recompute_num_layers=None, use_cpu_initialization=True,
)


class CheckpointLoadError(RuntimeError):
    """The directory holds no loadable checkpoint (the message says which file is missing or wrong)."""


@dataclass
class EvalModel:
    """A model in evaluation mode, its tokenizer, and where it came from."""

    module: torch.nn.Module
    tokenizer: MoCTokenizer
    backend: str
    """``megatron`` or ``hf``."""
    vocab_size: int
    """The tokenizer's vocabulary: logits beyond it (Megatron's padding rows) are dropped."""
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` token ids -> ``[b, s, vocab_size]`` fp32 logits."""
        if self.backend == "megatron":
            positions = torch.arange(tokens.shape[1], dtype=torch.long).unsqueeze(0).expand_as(tokens)
            out = self.module(tokens, positions, None)
        else:
            out = self.module(input_ids=tokens).logits
        return out[..., : self.vocab_size].float()

    __call__ = logits


def resolve_checkpoint(load_dir: str, iteration: int | None = None) -> tuple[str, int]:
    """``(path of iter_XXXXXXX, iteration)``: the given iteration, or the tracker's, or ``load_dir`` itself."""
    from moc_megatron.training import checkpoint_meta as meta

    try:
        return meta.resolve_existing(load_dir, iteration)
    except meta.CheckpointNotFoundError as exc:
        raise CheckpointLoadError(str(exc)) from exc


def saved_training_args(path: str) -> tuple[argparse.Namespace, dict]:
    """The flags and the common state (signature, iteration, ...) stored in the checkpoint at ``path``."""
    from moc_megatron.platform.megatron_versions import read_common_state

    common = read_common_state(path)
    if "args" not in common or "model_signature" not in common:
        raise CheckpointLoadError(f"{path}: no saved arguments/model signature (not a pretrain_moc.py checkpoint)")
    return argparse.Namespace(**common["args"]), common


def _ensure_single_process_world() -> None:
    from megatron.core import parallel_state

    from moc_megatron.platform import initialize_distributed

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() \
            * parallel_state.get_pipeline_model_parallel_world_size() * \
            parallel_state.get_expert_model_parallel_world_size() != 1:
        initialize_distributed()


def build_megatron_model_from_args(args: argparse.Namespace, signature: dict) -> torch.nn.Module:
    """The whole model (one process, CPU) for a checkpoint's saved flags; weights freshly initialised."""
    from moc_megatron.model.builder import ModelSettings, build_model
    from moc_megatron.training.config_from_args import transformer_config_from_args

    _ensure_single_process_world()
    for name, value in _SINGLE_PROCESS.items():
        setattr(args, name, value)
    config = transformer_config_from_args(args)
    settings = ModelSettings(vocab_size=signature["vocab_size"], max_sequence_length=args.max_position_embeddings,
                             tie_embeddings=signature["tie_embeddings"], rotary_base=signature["rotary_base"],
                             rope_scaling=bool(signature.get("rope_scaling")),
                             rope_scaling_factor=signature.get("rope_scaling_factor", 8.0))
    return build_model(config, settings, use_te=False)


def load_megatron(load_dir: str, iteration: int | None = None, tokenizer_type: str | None = None,
                  tokenizer_model: str | None = None) -> EvalModel:
    """A Megatron checkpoint as an :class:`EvalModel` (fp32, eval mode).

    The tokenizer is the one the run was trained with (``--tokenizer-type/--tokenizer-model`` saved in
    the checkpoint) unless given here.
    """
    from moc_megatron.platform import megatron_versions

    path, iteration = resolve_checkpoint(load_dir, iteration)
    args, common = saved_training_args(path)
    tokenizer_type = tokenizer_type or getattr(args, "tokenizer_type", None)
    tokenizer_model = tokenizer_model or getattr(args, "tokenizer_model", None)
    if not tokenizer_type or not tokenizer_model:
        raise CheckpointLoadError(f"{path} was trained without a tokenizer (mock data); give --tokenizer-type "
                                  "and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    model = build_megatron_model_from_args(args, common["model_signature"])
    loaded = megatron_versions.load_dist_checkpoint({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)
    model.float().eval()
    info = dict(checkpoint=path, iteration=iteration, num_layers=args.num_layers, hidden_size=args.hidden_size,
                memory_layers=list(getattr(args, "moc_memory_layers", None) or []),
                consumed_train_samples=common.get("train_state", {}).get("consumed_train_samples"),
                seq_length=getattr(args, "seq_length", None))
    return EvalModel(model, tokenizer, "megatron", tokenizer.vocab_size, info)


def load_hf(folder: str, tokenizer_type: str | None = None, tokenizer_model: str | None = None) -> EvalModel:
    """A Hugging Face model folder as an :class:`EvalModel` (``trust_remote_code=True``; nothing downloaded).

    The tokenizer is the folder's own (``tokenizer.json``, else a sentencepiece ``tokenizer.model``) unless
    given here.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointLoadError(f"--hf {folder}: no config.json (not a Hugging Face model folder)")
    if tokenizer_type is None:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer_type, tokenizer_model = "HuggingFaceTokenizer", folder
        elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
            tokenizer_type, tokenizer_model = "SentencePieceTokenizer", os.path.join(folder, "tokenizer.model")
        else:
            raise CheckpointLoadError(f"--hf {folder}: no tokenizer.json or tokenizer.model; give --tokenizer-type "
                                      "and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar above the evaluation's report
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                     dtype=torch.float32)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    return EvalModel(model, tokenizer, "hf", tokenizer.vocab_size, dict(folder=folder))
