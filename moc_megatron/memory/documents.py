"""Routing units that follow documents packed into a window (``document`` routing, ``chunk`` within documents).

Megatron packs documents back to back; ``document_ids`` ``[b, s]`` says which document each position
belongs to (a new document starts wherever the id changes, and at every row start). A routing unit is then
a document (``document``) or a chunk of ``chunk_size`` tokens counted from its document's start
(``chunk``), so units have ragged lengths. The memory read keeps fixed-shape units: each routing unit is
cut into *pieces* of ``piece_len`` tokens (the last one zero-padded); pieces carry their unit's route, so
the expert-parallel dispatcher and every chapter-attention implementation see ``[pieces, piece_len, ...]``
as they see sequences or chunks. ``piece_len`` is a configuration constant (``--moc-chunk-size``), so that
every expert-parallel rank sends pieces of the same shape whatever its documents.

Pieces are numbered in row-major token order; :meth:`DocumentUnits.split` scatters ``[s, b, ...]``
activations into them and :meth:`DocumentUnits.join` gathers them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def needs_document_ids(config) -> bool:
    """Whether a model of ``config`` (a ``MoCConfig``) reads where packed documents start: ``document`` routing,
    or documents separated (``reset_attention_mask``)."""
    memory = bool(getattr(config, "moc_memory_layers", None))
    return bool(config.reset_attention_mask) or (memory and config.moc_routing_unit == "document")


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: where a document starts (every row's first position, and wherever the id changes)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` position of each token within its document (0 at every document start)."""
    s = document_ids.shape[-1]
    index = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    start = torch.where(document_starts(document_ids), index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start


def document_ids_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, s]`` document index of each position of packed ``tokens``: a document ends with its ``eod`` token
    (Megatron's GPT dataset writes one after every document), so the position after an ``eod`` starts the next."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Megatron-style boolean attention mask ``[..., 1, s, s]`` of ``document_ids`` ``[..., s]``, ``True`` where
    attention is *not* allowed: a position attends to earlier positions of its own document only."""
    s = document_ids.shape[-1]
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (~(same & causal)).unsqueeze(-3)


@dataclass(frozen=True)
class DocumentUnits:
    """The unit and piece layout of one micro-batch of packed documents (see the module docstring).

    Build it with :meth:`build`; the tensors live on ``document_ids``' device.
    """

    unit: str
    """``document`` or ``chunk``."""
    piece_len: int
    """Tokens per piece (``--moc-chunk-size``)."""
    batch: int
    seq_length: int
    token_unit: torch.Tensor
    """``[b * s]`` routing unit of each token (row-major)."""
    unit_start: torch.Tensor
    """``[units]`` row-major index of each unit's first token."""
    unit_doc_start: torch.Tensor
    """``[units]`` row-major index of the first token of the unit's document."""
    unit_length: torch.Tensor
    """``[units]`` tokens in each unit."""
    slot: torch.Tensor
    """``[b * s]`` each token's place in the flattened ``[pieces * piece_len]`` grid."""
    piece_unit: torch.Tensor
    """``[pieces]`` the routing unit each piece reads for."""

    @property
    def num_units(self) -> int:
        """Routing units (routes) in the micro-batch."""
        return self.unit_start.numel()

    @property
    def num_pieces(self) -> int:
        """Fixed-length pieces the read runs over."""
        return self.piece_unit.numel()

    @classmethod
    def build(cls, document_ids: torch.Tensor, unit: str, piece_len: int) -> DocumentUnits:
        """The layout of ``document_ids`` ``[b, s]`` for ``unit`` (``document``, or ``chunk`` of ``piece_len``)."""
        if unit not in ("document", "chunk"):
            raise ValueError(f"document layouts route documents or chunks of them, not {unit!r}")
        if piece_len < 1:
            raise ValueError(f"piece length must be positive, not {piece_len}")
        b, s = document_ids.shape
        device = document_ids.device
        starts = document_starts(document_ids).flatten()
        flat = torch.arange(b * s, device=device)
        doc_of_token = torch.cumsum(starts.long(), 0) - 1
        doc_start = flat[starts]
        doc_end = torch.cat([doc_start[1:], doc_start.new_tensor([b * s])])
        pos_in_doc = flat - doc_start[doc_of_token]
        pieces_per_doc = torch.div(doc_end - doc_start + piece_len - 1, piece_len, rounding_mode="floor")
        piece_offset = torch.cumsum(pieces_per_doc, 0) - pieces_per_doc
        piece_of_token = piece_offset[doc_of_token] + torch.div(pos_in_doc, piece_len, rounding_mode="floor")
        slot = piece_of_token * piece_len + pos_in_doc % piece_len
        num_docs = doc_start.numel()
        piece_doc = torch.repeat_interleave(torch.arange(num_docs, device=device), pieces_per_doc)
        if unit == "document":
            return cls(unit, piece_len, b, s, doc_of_token, doc_start, doc_start, doc_end - doc_start, slot,
                       piece_doc)
        # chunk: a unit is a piece; it starts piece_len * j tokens into its document.
        piece_in_doc = torch.arange(piece_doc.numel(), device=device) - piece_offset[piece_doc]
        piece_start = doc_start[piece_doc] + piece_in_doc * piece_len
        piece_length = torch.minimum(doc_end[piece_doc] - piece_start, piece_start.new_tensor(piece_len))
        return cls(unit, piece_len, b, s, piece_of_token, piece_start, doc_start[piece_doc], piece_length, slot,
                   torch.arange(piece_doc.numel(), device=device))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router inputs ``[units, h]`` from ``hidden`` ``[s, b, h]`` (accumulated in at least fp32).

        - ``document``: the mean over the document (sees its future tokens, as the paper's sequence routing);
        - ``chunk``: the mean of the document's tokens before the chunk (zeros for a document's first chunk).
        """
        s, b, h = hidden.shape
        x = hidden.transpose(0, 1).reshape(b * s, h)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.unit == "document":
            sums = x.new_zeros(self.num_units, h).index_add_(0, self.token_unit, x)
            return sums / self.unit_length.unsqueeze(-1).to(x.dtype)
        prefix = torch.cat([x.new_zeros(1, h), torch.cumsum(x, dim=0)])  # prefix[i] = sum of tokens 0..i-1
        before = prefix[self.unit_start] - prefix[self.unit_doc_start]
        count = (self.unit_start - self.unit_doc_start).to(x.dtype).unsqueeze(-1)
        return torch.where(count > 0, before / count.clamp(min=1), torch.zeros_like(before))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b, *rest]`` -> ``[pieces, piece_len, *rest]`` (padding slots zero)."""
        s, b = x.shape[:2]
        rest = x.shape[2:]
        flat = x.transpose(0, 1).reshape(b * s, *rest)
        grid = flat.new_zeros(self.num_pieces * self.piece_len, *rest).index_copy(0, self.slot, flat)
        return grid.view(self.num_pieces, self.piece_len, *rest)

    def join(self, x: torch.Tensor, s: int, b: int) -> torch.Tensor:
        """Inverse of :meth:`split`: ``[pieces, piece_len, *rest]`` -> ``[s, b, *rest]`` (padding dropped)."""
        rest = x.shape[2:]
        flat = x.reshape(self.num_pieces * self.piece_len, *rest).index_select(0, self.slot)
        return flat.view(b, s, *rest).transpose(0, 1)

    def per_piece(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Rows of a per-unit tensor (chapters, weights) for every piece."""
        return per_unit.index_select(0, self.piece_unit)
