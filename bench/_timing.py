"""Interleaved timing shared by the benchmarks in this folder."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int,
                     iters: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU milliseconds per call of each step, alternating which runs first each round.

    CPU time (all threads of this process) is less disturbed by other processes than wall-clock time; with
    one thread it is the work done.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            times[name]["cpu"].append((time.process_time() - cpu) * 1e3)
            times[name]["wall"].append((time.perf_counter() - wall) * 1e3)
    return times
