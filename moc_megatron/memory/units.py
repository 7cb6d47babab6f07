"""The routing-unit layout: which tokens form a unit and in which order units are numbered.

One place owns it: the router's features (:meth:`RoutingUnits.pool`), the queries the memory read sends
(:meth:`RoutingUnits.split`) and the outputs it puts back (:meth:`RoutingUnits.join`) all number units
sequence-major, ``unit = sequence_index * units_per_sequence + position``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingUnits:
    """A routing-unit layout over ``[s, b, ...]`` activations.

    ``unit``: ``sequence`` (one unit per sequence), ``chunk`` (``chunk_size`` consecutive tokens; the last
    chunk is padded) or ``token`` (one unit per token).
    """

    unit: str
    chunk_size: int

    def __post_init__(self) -> None:
        if self.unit not in ("sequence", "chunk", "token"):
            raise ValueError(f"unknown routing unit {self.unit!r}")

    def unit_length(self, s: int) -> int:
        """Tokens per unit for sequences of ``s`` tokens (padding included)."""
        return {"sequence": s, "token": 1}.get(self.unit, self.chunk_size)

    def units_per_sequence(self, s: int) -> int:
        """How many units one sequence of ``s`` tokens is split into."""
        return {"sequence": 1, "token": s}.get(self.unit, -(-s // self.chunk_size))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b, *rest]`` -> ``[b * units_per_sequence, unit_length, *rest]`` (chunks zero-padded)."""
        s, b = x.shape[:2]
        rest = x.shape[2:]
        x = x.transpose(0, 1)
        if self.unit == "sequence":
            return x
        if self.unit == "token":
            return x.reshape(b * s, 1, *rest)
        pad = -s % self.chunk_size
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * len(rest) + (0, pad))
        return x.reshape(b * ((s + pad) // self.chunk_size), self.chunk_size, *rest)

    def join(self, x: torch.Tensor, s: int, b: int) -> torch.Tensor:
        """Inverse of :meth:`split`: ``[units, unit_length, *rest]`` -> ``[s, b, *rest]`` (padding dropped)."""
        rest = x.shape[2:]
        return x.reshape(b, -1, *rest)[:, :s].transpose(0, 1)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router inputs, one row per unit in :meth:`split`'s order, from ``hidden`` ``[s, b, h]``.

        - ``sequence``: the mean over the whole sequence (sees future tokens, as in the paper);
        - ``chunk``: chunk ``j`` is routed from the mean of the tokens before it (zeros for the first);
        - ``token``: every token's own hidden state.
        """
        s, b, h = hidden.shape
        x = hidden.transpose(0, 1)  # [b, s, h]
        if self.unit == "sequence":
            return x.mean(dim=1)
        if self.unit == "token":
            return x.reshape(b * s, h)
        num_chunks = self.units_per_sequence(s)
        prefix = torch.cumsum(x, dim=1)  # prefix[:, t] = sum of tokens 0..t
        starts = torch.arange(num_chunks, device=x.device) * self.chunk_size  # tokens before chunk j
        counts = starts.clamp(min=1).to(x.dtype).view(1, num_chunks, 1)
        before = prefix[:, (starts - 1).clamp(min=0)]  # sum of tokens 0..start-1
        before = torch.where((starts > 0).view(1, num_chunks, 1), before, torch.zeros_like(before))
        return (before / counts).reshape(b * num_chunks, h)

    def per_piece(self, per_unit: torch.Tensor) -> torch.Tensor:
        """Rows of a per-unit tensor for every read unit: the units are read whole, so ``per_unit`` itself."""
        return per_unit
