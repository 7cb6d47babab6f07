"""Errors that stop a run at start-up with a one- or two-line message, and how the entry scripts print them.

Every rank meets the same bad input (flags, files), so the message is printed once per node (by the
process with ``LOCAL_RANK`` 0, i.e. once on a single machine), without a usage text or a traceback,
and every rank exits with the same non-zero status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from moc_megatron.errors import MoCError

EXIT_ARGUMENTS = 2
EXIT_STARTUP = 1


# "Bad input, say so and stop" (not a bug: no traceback). A missing file named by a flag is one too.
STARTUP_ERRORS: tuple[type[BaseException], ...] = (MoCError, FileNotFoundError)


def print_once(message: str) -> None:
    """Print to stderr on the first process of each node (all processes without torchrun)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def exit_with_error(prog: str, message: str, status: int) -> NoReturn:
    """``{prog}: error: {message}`` once, then exit with ``status`` (no usage, no traceback)."""
    print_once(f"{prog}: error: {message}")
    sys.exit(status)


def run_entry_point(prog: str, main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`~moc_megatron.errors.MoCError` prints one message and exits non-zero."""
    try:
        main()
    except STARTUP_ERRORS as exc:
        exit_with_error(prog, str(exc), EXIT_STARTUP)
