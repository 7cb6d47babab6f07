"""Models to evaluate, behind one interface: a Megatron checkpoint or a Hugging Face model folder.

:func:`load_megatron` rebuilds the model a ``pretrain_moc.py``/``finetune_moc.py`` checkpoint was trained
as, from the model record saved in it (:mod:`moc_megatron.checkpoint.model_config`; older checkpoints: their
flags and model signature), in this one process on the CPU (any TP/PP/EP layout it was saved at:
``torch_dist`` stores global tensors), and loads its weights. MoC and dense
(no memory layers) checkpoints alike. :func:`load_hf` loads a folder with transformers'
``AutoModelForCausalLM`` (``trust_remote_code=True``, for the exported ``modeling_moc.py``).

Both return an :class:`EvalModel`, whose ``logits`` is the :data:`~moc_megatron.eval.scoring.LogitsFn`
the scorers take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from moc_megatron.data.tokenizer import MoCTokenizer, build_tokenizer
from moc_megatron.errors import MoCError
from moc_megatron.memory.documents import document_ids_from_tokens, needs_document_ids


class CheckpointLoadError(MoCError, RuntimeError):
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
            extra = {}
            if needs_document_ids(self.module.config):  # documents end with the end-of-document token
                extra["document_ids"] = document_ids_from_tokens(tokens, self.tokenizer.eod)
            out = self.module(tokens, positions, None, **extra)
        else:
            out = self.module(input_ids=tokens).logits
        return out[..., : self.vocab_size].float()

    __call__ = logits


def resolve_checkpoint(load_dir: str, iteration: int | None = None) -> tuple[str, int]:
    """``(path of iter_XXXXXXX, iteration)``: the given iteration, or the tracker's, or ``load_dir`` itself."""
    from moc_megatron.checkpoint.layout import CheckpointNotFoundError, resolve_existing

    try:
        return resolve_existing(load_dir, iteration)
    except CheckpointNotFoundError as exc:
        raise CheckpointLoadError(str(exc)) from exc


def saved_common_state(path: str) -> dict:
    """The common state (flags, model record, signature, iteration, ...) of the checkpoint at ``path``."""
    from moc_megatron.platform.megatron_versions import read_common_state

    common = read_common_state(path)
    if "model_config" not in common and ("args" not in common or "model_signature" not in common):
        raise CheckpointLoadError(f"{path}: no model_config or saved arguments/model signature "
                                  "(not a pretrain_moc.py checkpoint)")
    return common


def _ensure_single_process_world() -> None:
    from megatron.core import parallel_state

    from moc_megatron.platform import initialize_distributed

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() \
            * parallel_state.get_pipeline_model_parallel_world_size() * \
            parallel_state.get_expert_model_parallel_world_size() != 1:
        initialize_distributed()


def build_megatron_model(common: dict, where: str) -> torch.nn.Module:
    """The whole model (one process, CPU, weights freshly initialised) of a checkpoint's common state, in the
    precision it was trained in (``where`` names the checkpoint in errors)."""
    from moc_megatron.checkpoint.model_config import config_from_record, read_model_record
    from moc_megatron.model.builder import build_model

    _ensure_single_process_world()
    runtime = {"bf16": bool(common.get("args", {}).get("bf16"))}
    config, settings = config_from_record(read_model_record(common, where), runtime, use_cpu_initialization=True)
    return build_model(config, settings, use_te=False)


def load_megatron(load_dir: str, iteration: int | None = None, tokenizer_type: str | None = None,
                  tokenizer_model: str | None = None) -> EvalModel:
    """A Megatron checkpoint as an :class:`EvalModel` (fp32, eval mode).

    The tokenizer is the one the run was trained with (``--tokenizer-type/--tokenizer-model`` saved in
    the checkpoint) unless given here.
    """
    from moc_megatron.platform import megatron_versions

    path, iteration = resolve_checkpoint(load_dir, iteration)
    common = saved_common_state(path)
    args = common.get("args", {})
    tokenizer_type = tokenizer_type or args.get("tokenizer_type")
    tokenizer_model = tokenizer_model or args.get("tokenizer_model")
    if not tokenizer_type or not tokenizer_model:
        raise CheckpointLoadError(f"{path} was trained without a tokenizer (mock data); give --tokenizer-type "
                                  "and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    model = build_megatron_model(common, path)
    loaded = megatron_versions.load_dist_checkpoint({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"], strict=True)
    model.float().eval()
    config = model.config
    info = dict(checkpoint=path, iteration=iteration, num_layers=config.num_layers, hidden_size=config.hidden_size,
                memory_layers=list(config.moc_memory_layers),
                consumed_train_samples=common.get("train_state", {}).get("consumed_train_samples"),
                seq_length=args.get("seq_length"))
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
