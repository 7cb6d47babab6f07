"""The one place a MoC model is built: pretraining, fine-tuning, conversion and tests all call this."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core import parallel_state

from moc_megatron.config import MoCConfig
from moc_megatron.model.moc_model import MoCGPTModel


@dataclass(frozen=True)
class ModelSettings:
    """Model-level settings that megatron-core keeps outside ``TransformerConfig``."""

    vocab_size: int
    """Vocabulary size of the embedding and output layers (already padded)."""

    max_sequence_length: int
    """Longest sequence the model is built for."""

    tie_embeddings: bool = True
    """Share the input embedding and output layer weights."""

    rotary_base: int = 10000
    """RoPE base period."""

    rope_scaling: bool = False
    """Llama 3.x RoPE frequency scaling (megatron-core's ``rope_scaling``)."""

    rope_scaling_factor: float = 8.0
    """Its factor."""


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Megatron-LM's vocabulary padding: round up to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_model(config: MoCConfig, settings: ModelSettings, pre_process: bool = True,
                post_process: bool = True, vp_stage: int | None = None,
                use_te: bool | None = None) -> MoCGPTModel:
    """One model chunk: the layers of pipeline stage (and virtual stage ``vp_stage``) of this rank.

    ``pre_process`` adds the embedding, ``post_process`` the final norm and output layer. Transformer
    Engine layer specs are used when TE imports and ``use_te`` is not False.
    """
    return MoCGPTModel(
        config,
        vocab_size=settings.vocab_size,
        max_sequence_length=settings.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        tie_embeddings=settings.tie_embeddings,
        rotary_base=settings.rotary_base,
        rope_scaling=settings.rope_scaling,
        rope_scaling_factor=settings.rope_scaling_factor,
        vp_stage=vp_stage,
        use_te=use_te,
    )


def build_model_chunks(config: MoCConfig, settings: ModelSettings,
                       use_te: bool | None = None) -> list[MoCGPTModel]:
    """The model chunks of this rank: one per virtual pipeline stage (one without interleaving).

    Needs megatron-core's parallel state; first/last stage come from it as in Megatron-LM's
    ``get_model``.
    """
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vpp) if vpp is not None else [None]
    chunks = []
    for vp_stage in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model(config, settings, pre, post, vp_stage=vp_stage, use_te=use_te))
    return chunks
