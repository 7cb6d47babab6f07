"""Pretraining data: megatron-core GPT datasets (blended or mock), a resumable sampler, and iterators.

Datasets are built with ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` (``GPTDataset`` on
Megatron ``.bin/.idx`` files, ``MockGPTDataset`` for ``--mock-data``) on the ranks that feed the model:
the first and last pipeline stages (tokens in, labels out). Every tensor-parallel rank reads the same
samples itself, so nothing is broadcast.

The training iterator's position is ``consumed_train_samples``: :class:`PretrainingSampler` (Megatron-LM's
``MegatronPretrainingSampler``) starts from it, so a resumed run reads exactly the samples an
uninterrupted run would. Evaluation always reads the first ``eval_iters`` global batches of the
validation split, so successive evaluations are comparable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from moc_megatron import platform
from moc_megatron.data.dataset_check import check_indexed_dataset
from moc_megatron.data.tokenizer_record import TokenizerRecord, check_same_tokenizer, read_dataset_record
from moc_megatron.errors import MoCError
from moc_megatron.memory.documents import document_ids_from_tokens, needs_document_ids
from moc_megatron.training.run_config import DataConfig, RunConfig


@dataclass
class DatasetTokenizer:
    """What megatron's GPT datasets read from a tokenizer: vocabulary size, end of document, padding,
    and ``unique_identifiers`` (part of the dataset description that names the index caches)."""

    vocab_size: int
    eod: int = 0
    pad: int | None = None
    name: str = "none"

    @property
    def unique_identifiers(self) -> dict:
        """Identifies the tokenizer in megatron's dataset descriptions."""
        return {"class": type(self).__name__, "tokenizer": self.name, "vocab_size": self.vocab_size}


def dataset_tokenizer(tokenizer=None, vocab_size: int | None = None, name: str = "none") -> DatasetTokenizer:
    """A :class:`DatasetTokenizer` for a ``MoCTokenizer`` (or for a bare vocabulary size)."""
    if tokenizer is None:
        return DatasetTokenizer(vocab_size=vocab_size)
    return DatasetTokenizer(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, name)


def data_prefixes(data: DataConfig) -> list[str]:
    """Every indexed-dataset prefix the run reads (``--data-path``, the per-split paths, ``--sft-data-path``)."""
    prefixes: list[str] = []
    for blend in [data.data_blend, *(data.data_blend_per_split or [])]:
        if blend is not None:
            prefixes += blend[0]
    sft = data.sft_data_path
    if sft:
        prefixes += [f"{sft}_tokens", f"{sft}_loss_mask"]
    return list(dict.fromkeys(prefixes))


def check_data_inputs(data: DataConfig, tokenizer_record: TokenizerRecord | None) -> None:
    """Stop before training if a dataset is truncated/corrupt or was made with another tokenizer.

    Raises ``DatasetFileError`` or ``TokenizerMismatchError``, naming the file. A dataset without a
    tokenizer record (made before records existed) is not compared.
    """
    for prefix in data_prefixes(data):
        check_indexed_dataset(prefix)
        if tokenizer_record is not None:
            check_same_tokenizer(tokenizer_record, f"this run's --tokenizer-model {data.tokenizer_model}",
                                 read_dataset_record(prefix), f"dataset {prefix}.idx")


class PretrainingSampler:
    """Megatron-LM's ``MegatronPretrainingSampler``: consecutive samples from ``consumed_samples`` on.

    Every global step takes ``micro_batch_size * data_parallel_size`` consecutive sample indices per
    micro-batch; data-parallel rank ``r`` gets the ``r``-th slice of ``micro_batch_size`` of them.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} >= total_samples {total_samples}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - self.step + 1, self.step):
            yield list(range(first + start, first + start + self.micro_batch_size))


def is_dataset_built_on_rank() -> bool:
    """Only the pipeline stages that read tokens (first) or labels (last) need data."""
    return parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()


class WithDocumentIds(torch.utils.data.Dataset):
    """A GPT dataset whose samples also carry ``document_ids`` ``[seq_length]``: a document ends with ``eod``."""

    def __init__(self, dataset, eod: int) -> None:
        self.dataset, self.eod = dataset, eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[idx])
        sample["document_ids"] = document_ids_from_tokens(sample["tokens"].view(1, -1), self.eod).view(-1)
        return sample


def dataset_config(data: DataConfig, seed: int, tokenizer) -> GPTDatasetConfig:
    """megatron-core's GPT dataset configuration for the run's data."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=data.data_blend,
        blend_per_split=data.data_blend_per_split,
        split=data.split if data.data_blend is not None else None,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=False,  # the model builds the block-causal mask from the batch's document ids
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,  # causal attention needs no explicit mask
    )


def split_sizes(run: RunConfig) -> list[int]:
    """Samples of the train/valid/test splits: ``--train-iters`` and ``--eval-iters`` global batches."""
    gbs = run.schedule.global_batch_size
    eval_samples = run.logging.eval_iters * gbs
    return [run.schedule.train_iters * gbs, eval_samples, eval_samples]


class DatasetSplitError(MoCError, ValueError):
    """A split that must give samples holds no document of a dataset."""


SPLIT_NAMES = ("training", "validation", "test")
SPLIT_SIZE_FLAGS = ("--train-iters", "--eval-iters", "--eval-iters")


def check_splits_have_documents(config: GPTDatasetConfig, sizes: list[int]) -> None:
    """Raise :class:`DatasetSplitError` if a split asked for samples gets none of a dataset's documents (megatron's
    GPT dataset would loop forever counting epochs of zero tokens)."""
    if config.mock or config.blend is None:  # per-split blends read whole datasets, never empty (checked)
        return
    for prefix in config.blend[0]:
        documents = check_indexed_dataset(prefix).documents  # reads the index header once per dataset
        for i, bounds in enumerate(config.split_matrix):
            if bounds is None or not sizes[i]:
                continue
            begin, end = (int(round(b * documents)) for b in bounds)  # megatron's rounding of the split bounds
            if end <= begin:
                raise DatasetSplitError(
                    f"{prefix}: the {SPLIT_NAMES[i]} split needs {sizes[i]} samples ({SPLIT_SIZE_FLAGS[i]}), but "
                    f"--split {config.split} leaves it none of its {documents} documents; give that split a larger "
                    f"share (e.g. --split 90,10,0), more documents, or {SPLIT_SIZE_FLAGS[i]} 0")


def build_datasets(run: RunConfig, tokenizer) -> tuple:
    """``(train, valid, test)`` datasets (``None`` where a split is empty or this rank needs no data)."""
    sizes = split_sizes(run)
    config = dataset_config(run.data, run.seed, tokenizer)
    check_splits_have_documents(config, sizes)
    cls = MockGPTDataset if config.mock else GPTDataset
    if not needs_document_ids(run.model):
        return tuple(BlendedMegatronDatasetBuilder(cls, sizes, is_dataset_built_on_rank, config).build())
    # Every pipeline stage with a memory layer or a masked attention needs the document ids.
    built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return tuple(None if ds is None else WithDocumentIds(ds, tokenizer.eod) for ds in built)


def _loader(dataset, consumed_samples: int, run: RunConfig) -> torch.utils.data.DataLoader:
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=run.schedule.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=run.data.num_workers,
        pin_memory=platform.pin_memory(), persistent_workers=False,
        # Its own generator: starting an iterator draws a seed, which must not move the global RNG
        # (dropout), or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(run.seed),
    )


def data_iterators(dataset, consumed_samples: int, run: RunConfig, num_chunks: int) -> list:
    """One iterator per model chunk (the interleaved schedule reads each chunk's own), or ``None``s."""
    if dataset is None:
        return [None] * num_chunks
    return [iter(_loader(dataset, consumed_samples, run)) for _ in range(num_chunks)]


def get_batch(data_iterator, pre_process: bool, post_process: bool, documents: bool = False
              ) -> dict[str, torch.Tensor]:
    """The next micro-batch on the compute device: what this model chunk needs of it, or ``{}``
    (``documents``: the chunk reads the document ids, whatever its stage)."""
    if not (pre_process or post_process or documents):
        return {}
    batch = next(data_iterator)
    device = platform.get_device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
