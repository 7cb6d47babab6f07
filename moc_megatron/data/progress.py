"""Progress on stderr: a tqdm bar on a terminal, a Megatron-style line every ``log_interval`` documents otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _rate(value: float, seconds: float) -> float:
    return value / seconds if seconds > 0 else 0.0


class Progress:
    """Counts documents, tokens and input bytes and shows their rates (docs/s, tokens/s, MB/s)."""

    def __init__(
        self,
        total_bytes: int | None,
        log_interval: int = 1000,
        enabled: bool = True,
        stream: TextIO | None = None,
        desc: str = "preprocess",
        unit: str = "documents",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.log_interval = max(1, log_interval)
        self.enabled = enabled
        self.unit = unit
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self._next_log = self.log_interval
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                desc=desc,
                mininterval=0.5,
            )

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def rates(self) -> tuple[float, float, float]:
        """Documents/s, tokens/s and MB/s (MiB of input) so far."""
        t = self.elapsed
        return _rate(self.docs, t), _rate(self.tokens, t), _rate(self.bytes, t) / 2**20

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        """Add to the counters and refresh the display when due."""
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            docs_s, tokens_s, _ = self.rates()
            self._bar.set_postfix_str(f"{docs_s:,.0f} docs/s, {tokens_s:,.0f} tokens/s", refresh=False)
            self._bar.update(nbytes)
        elif self.docs >= self._next_log:
            self._next_log = (self.docs // self.log_interval + 1) * self.log_interval
            docs_s, tokens_s, mb_s = self.rates()
            print(
                f"Processed {self.docs} {self.unit} ({docs_s:,.1f} docs/s, {tokens_s:,.0f} tokens/s, {mb_s:.2f} MB/s).",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
