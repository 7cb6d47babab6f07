"""What a checkpoint's common state holds besides the tensors.

``checkpoint_version``, ``iteration``, ``train_state`` (the data position), ``args`` (the saving run's
flags, Megatron-LM's convention), ``model_config`` (the model as data, :mod:`.model_config`),
``model_signature`` (:mod:`.signature`), ``parallel_layout``, ``optimizer_metadata`` and whether optimizer
and RNG states were saved; ``tokenizer`` when the run had one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moc_megatron.checkpoint.model_config import MODEL_CONFIG_KEY, model_record
from moc_megatron.checkpoint.signature import model_signature
from moc_megatron.config import MoCConfig
from moc_megatron.data.tokenizer_record import CHECKPOINT_KEY, TokenizerRecord
from moc_megatron.model.builder import ModelSettings

CHECKPOINT_VERSION = 3.0


def optimizer_metadata(use_distributed_optimizer: bool, fully_reshardable: bool) -> dict:
    """megatron's optimizer ``sharded_state_dict`` metadata (stored with the checkpoint, compared on load)."""
    metadata = {"chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    return metadata


def common_state(*, iteration: int, consumed_train_samples: int, saved_args: Mapping[str, Any], config: MoCConfig,
                 settings: ModelSettings, parallel_layout: dict, optimizer: dict, saved_optimizer: bool,
                 saved_rng: bool, tokenizer_record: TokenizerRecord | None = None) -> dict[str, Any]:
    """The common-state entries of a checkpoint (``optimizer``: its :func:`optimizer_metadata`)."""
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "train_state": {"consumed_train_samples": consumed_train_samples},
        "args": dict(saved_args),
        MODEL_CONFIG_KEY: model_record(config, settings),
        "model_signature": model_signature(config, settings),
        "parallel_layout": parallel_layout,
        "optimizer_metadata": optimizer,
        "saved_optimizer": saved_optimizer,
        "saved_rng": saved_rng,
    }
    if tokenizer_record is not None:
        state[CHECKPOINT_KEY] = tokenizer_record.to_dict()
    return state
