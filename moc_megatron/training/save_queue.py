"""megatron-core's checkpoint writer processes die with their rank, whatever killed it (SIGKILL included).

``dist_checkpointing``'s ``FileSystemWriterAsync`` (megatron-core 0.16.1) collects write results through
a queue held by a ``multiprocessing`` manager, a spawned server process it starts on the first save. If
the rank is SIGKILLed (a failed node, an elastic restart) that server is orphaned and lives on, holding
the rank's stdout/stderr open: every restart round leaks a process, and whatever waits for the job's
output (a test, a log collector) waits forever. :func:`install_save_results_queue` creates the same
queue first, from a manager whose server asks Linux to kill it when its parent dies.

The same writer forks one child per write bucket (``write_preloaded_data_multiproc``) and waits for them
on a ``JoinableQueue``; a child whose rank was killed blocks in ``task_done`` for good, holding its copy
of the rank's memory and output. :func:`writer_children_die_with_rank` wraps a save so that every process
forked during it asks for the same signal (an ``os.register_at_fork`` hook, active only inside the block).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from multiprocessing.managers import SyncManager

_manager: SyncManager | None = None
_fork_parent: int | None = None
"""While a save runs: the pid whose forked children must die with it (``None`` outside a save)."""
_fork_hook_installed = False


def _die_with_parent() -> None:
    """Manager-server initializer: SIGKILL on the parent's death (``PR_SET_PDEATHSIG``, Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _after_fork_in_child() -> None:
    """``os.register_at_fork`` hook: inside :func:`writer_children_die_with_rank`, die with the parent."""
    global _fork_parent
    if _fork_parent is None:
        return
    _die_with_parent()
    if os.getppid() != _fork_parent:  # the parent died before the request took effect
        os._exit(1)
    _fork_parent = os.getpid()  # this child's own forks die with it in turn


@contextlib.contextmanager
def writer_children_die_with_rank() -> Iterator[None]:
    """Every process forked (``os.fork``, multiprocessing's fork context) inside the block is SIGKILLed
    when its parent dies. Wraps ``dist_checkpointing.save``; forks elsewhere (data loader workers) are
    left as they are."""
    global _fork_parent, _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_after_fork_in_child)  # cannot be removed: it checks _fork_parent
        _fork_hook_installed = True
    _fork_parent = os.getpid()
    try:
        yield
    finally:
        _fork_parent = None


@contextlib.contextmanager
def _entry_script_hidden() -> Iterator[None]:
    """Start a spawn child without re-running the entry script's imports in it.

    ``spawn`` imports ``__main__`` (by file or module name) in the child: for pretrain_moc.py that is
    torch, megatron-core and moc_megatron, seconds of CPU per rank at every run's first save. The server
    needs only this module and the classes of what is put in the queue (imported as it unpickles them).
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if "__spec__" in saved:
        main.__spec__ = None
    if "__file__" in saved:
        del main.__file__
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def install_save_results_queue() -> None:
    """Give megatron-core's async filesystem writer its result queue before it makes its own (idempotent)."""
    global _manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "missing") is not None:
        return  # already created, or a megatron-core without this global: leave it alone
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    with _entry_script_hidden():
        _manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = _manager.Queue()
