"""An ordered, bounded ``multiprocessing.Pool`` map for the preprocessing tools."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

Meta = TypeVar("Meta")


def worker_context() -> mp.context.BaseContext:
    """``fork`` (fast) when this process has one thread, else ``forkserver``.

    Forking a process whose other threads may hold a lock (OpenMP, gloo, a writer thread: the tools called
    in-process after training, as the tests do) can deadlock the child; ``forkserver`` starts workers from a
    clean single-threaded server instead.
    """
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return mp.get_context()
    return mp.get_context("fork" if threads == 1 else "forkserver")


def ordered_map(
    func: Callable[..., Any],
    tasks: Iterable[tuple[Meta, tuple[Any, ...]]],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    window: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> Iterator[tuple[Meta, Any]]:
    """Yield ``(meta, func(*args))`` for each task, in task order, computed by ``workers`` processes.

    At most ``window`` tasks (default ``4 * workers``) are in flight. This is ``Pool.imap`` with back-pressure:
    imap's feeder thread reads the whole task iterable ahead when the workers are slower than the reader,
    which for a corpus means holding it all in memory. Close the generator (or exhaust it) to stop the pool;
    a worker exception is re-raised here. ``on_start`` runs once the workers exist (they are forked first).
    """
    window = window or 4 * workers
    pool = worker_context().Pool(workers, initializer=initializer, initargs=initargs)
    ok = False
    try:
        if on_start is not None:
            on_start()
        pending: deque = deque()
        for meta, args in tasks:
            pending.append((meta, pool.apply_async(func, args)))
            if len(pending) >= window:
                done_meta, result = pending.popleft()
                yield done_meta, result.get()
        while pending:
            done_meta, result = pending.popleft()
            yield done_meta, result.get()
        ok = True
    finally:
        if ok:
            pool.close()
        else:
            pool.terminate()
        pool.join()
