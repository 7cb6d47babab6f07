"""A weights-only checkpoint at iteration 0: what ``convert_checkpoint.py import`` writes (tests build theirs so too).

No optimizer, scheduler or RNG state; the common state of :mod:`moc_megatron.checkpoint.metadata` with the
layout its flags name. ``pretrain_moc.py --load`` starts from it at iteration 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moc_megatron.checkpoint.metadata import common_state, optimizer_metadata
from moc_megatron.config import MoCConfig
from moc_megatron.data.tokenizer_record import TokenizerRecord
from moc_megatron.model.builder import ModelSettings


def save_weights_checkpoint(models: dict, config: MoCConfig, settings: ModelSettings, path: str,
                            saved_args: Mapping[str, Any], tokenizer_record: TokenizerRecord | None = None) -> None:
    """Collective ``dist_checkpointing.save`` of model chunks' sharded state dicts (``{"model": ...}``, or
    ``model0``, ``model1``, ... per virtual stage) as a weights-only iteration-0 checkpoint in ``path``.

    ``saved_args`` are the flags stored with it (their parallel sizes are the layout it records);
    ``tokenizer_record`` is checked by runs that load it.
    """
    from megatron.core import dist_checkpointing

    layout = dict(tp=saved_args.get("tensor_model_parallel_size", 1),
                  pp=saved_args.get("pipeline_model_parallel_size", 1), dp=1,
                  ep=saved_args.get("expert_model_parallel_size", 1),
                  vpp=saved_args.get("virtual_pipeline_model_parallel_size"))
    optimizer = optimizer_metadata(bool(saved_args.get("use_distributed_optimizer")),
                                   bool(saved_args.get("dist_ckpt_optim_fully_reshardable")))
    state = {**models, **common_state(iteration=0, consumed_train_samples=0, saved_args=saved_args, config=config,
                                      settings=settings, parallel_layout=layout, optimizer=optimizer,
                                      saved_optimizer=False, saved_rng=False, tokenizer_record=tokenizer_record)}
    dist_checkpointing.save(state, path)
