"""A split that must give samples but gets no document is refused in one line (megatron would loop forever)."""

from __future__ import annotations

import numpy
import pytest
import torch
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from moc_megatron.training.data import DatasetSplitError, check_splits_have_documents, dataset_tokenizer


def write_documents(prefix: str, count: int) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for i in range(count):
        builder.add_document(torch.arange(5 + i, dtype=torch.int32) % 50, [5 + i])
    builder.finalize(prefix + ".idx")
    return prefix


def config(blend=None, split=None, blend_per_split=None) -> GPTDatasetConfig:
    return GPTDatasetConfig(random_seed=1, sequence_length=16, blend=blend, split=split,
                            blend_per_split=blend_per_split, tokenizer=dataset_tokenizer(vocab_size=64),
                            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)


def test_empty_validation_split_is_refused(tmp_path):
    small = write_documents(str(tmp_path / "small"), 16)  # 2 % of 16 documents rounds to none
    large = write_documents(str(tmp_path / "large"), 200)
    blend = ([large, small], [0.5, 0.5])
    with pytest.raises(DatasetSplitError) as err:
        check_splits_have_documents(config(blend, "98,2,0"), [32, 8, 8])
    message = str(err.value)
    assert message.startswith(f"{small}: the validation split needs 8 samples (--eval-iters)")
    assert "--split 98,2,0 leaves it none of its 16 documents" in message and "\n" not in message
    check_splits_have_documents(config(blend, "98,2,0"), [32, 0, 0])  # --eval-iters 0: nothing to draw
    check_splits_have_documents(config(blend, "80,20,0"), [32, 8, 8])  # 3 of 16 documents
    check_splits_have_documents(config(([large], [1.0]), "98,2,0"), [32, 8, 8])  # 4 of 200 documents

