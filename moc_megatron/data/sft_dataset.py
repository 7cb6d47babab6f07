"""Serving ``tools/preprocess_sft.py`` output to training.

Each item is one stored sample (a conversation, or several packed ones), cut or padded to ``seq_length``
the way Megatron-LM's GPT and SFT datasets do: ``seq_length + 1`` tokens are taken, ``tokens`` are the
first ``seq_length`` and ``labels`` the last ``seq_length``. Item fields (torch tensors):

- ``tokens``, ``labels``: int64 ``[seq_length]``; padding is the pad id.
- ``loss_mask``: float32 ``[seq_length]``; 1 where the label is an assistant token of the same conversation.
- ``position_ids``: int64 ``[seq_length]``; restart at 0 for every conversation (padding continues the last).
- ``cu_seqlens``: int32 ``[seq_length + 1]``: conversation start offsets then ``seq_length``; trailing entries
  repeat ``seq_length`` so that items stack (Megatron-LM's convention; padding belongs to the last sequence).
- ``max_seqlen``: int32 scalar, the longest sequence in ``cu_seqlens``.
- ``num_seqs``: int32 scalar, the number of valid sequences in ``cu_seqlens``.
- ``segment_ids``: int64 ``[seq_length]``, the conversation index of each position (same segments as
  ``cu_seqlens``); :func:`packed_attention_mask` turns it into a causal block mask.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from moc_megatron.data.sft_preprocess import SFT_FORMAT
from moc_megatron.memory.documents import block_causal_mask as packed_attention_mask  # noqa: F401 (re-export)


class SFTDataset(torch.utils.data.Dataset):
    """Samples of a ``{prefix}_tokens`` / ``{prefix}_loss_mask`` pair written by ``tools/preprocess_sft.py``."""

    def __init__(self, path_prefix: str, seq_length: int, pad_id: int | None = None) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if seq_length < 1:
            raise ValueError("seq_length must be >= 1")
        self.path_prefix = path_prefix
        self.seq_length = seq_length
        meta_path = f"{path_prefix}_meta.json"
        self.meta: dict[str, Any] = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                self.meta = json.load(f)
            if self.meta.get("format") != SFT_FORMAT:
                raise ValueError(f"{meta_path} is not {SFT_FORMAT} metadata")
        if pad_id is None:
            if "pad" not in self.meta:
                raise ValueError(f"no {meta_path}: pass pad_id")
            pad_id = int(self.meta["pad"])
        self.pad_id = pad_id
        for suffix in ("_tokens", "_loss_mask"):
            if not IndexedDataset.exists(path_prefix + suffix):
                raise FileNotFoundError(f"{path_prefix}{suffix}.bin/.idx not found")
        self.tokens = IndexedDataset(path_prefix + "_tokens")
        self.mask = IndexedDataset(path_prefix + "_loss_mask")
        if not np.array_equal(self.tokens.sequence_lengths, self.mask.sequence_lengths) or not np.array_equal(
            self.tokens.document_indices, self.mask.document_indices
        ):
            raise ValueError(f"{path_prefix}_tokens and _loss_mask do not have the same layout")
        self.document_indices = np.asarray(self.tokens.document_indices)
        self.sequence_lengths = np.asarray(self.tokens.sequence_lengths)

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def sample_arrays(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored ``(tokens, assistant mask, conversation lengths)`` of sample ``idx``, uncut."""
        first, last = int(self.document_indices[idx]), int(self.document_indices[idx + 1])
        tokens = np.concatenate([self.tokens[i] for i in range(first, last)]).astype(np.int64)
        mask = np.concatenate([self.mask[i] for i in range(first, last)]).astype(np.float32)
        return tokens, mask, self.sequence_lengths[first:last].astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        seq = self.seq_length
        raw, raw_mask, lengths = self.sample_arrays(idx)
        raw, raw_mask = raw[: seq + 1], raw_mask[: seq + 1]
        n = len(raw)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        starts = starts[starts < n]

        tokens = np.full(seq, self.pad_id, dtype=np.int64)
        labels = np.full(seq, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(seq, dtype=np.float32)
        tokens[: min(n, seq)] = raw[:seq]
        labels[: n - 1] = raw[1:]
        loss_mask[: n - 1] = raw_mask[1:]
        # The label of a conversation's last position is the next conversation's first token: no loss there.
        cross = starts[1:] - 1
        loss_mask[cross[cross < seq]] = 0.0

        bounds = [int(s) for s in starts if s < seq] + [seq]
        segment_ids = np.zeros(seq, dtype=np.int64)
        position_ids = np.zeros(seq, dtype=np.int64)
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[lo:hi] = j
            position_ids[lo:hi] = np.arange(hi - lo)
        cu_seqlens = np.full(seq + 1, seq, dtype=np.int32)
        cu_seqlens[: len(bounds)] = bounds
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": torch.tensor(int(np.diff(bounds).max()), dtype=torch.int32),
            "num_seqs": torch.tensor(len(bounds) - 1, dtype=torch.int32),
            "segment_ids": torch.from_numpy(segment_ids),
        }
