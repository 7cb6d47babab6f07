"""Exit statuses and the failure handling shared by the preprocessing tools."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Stats = TypeVar("Stats")


@dataclass
class RunStats:
    """What every preprocessing run counts about its input and output."""

    input_bytes: int = 0
    """Uncompressed input bytes read."""
    blank_lines: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_guarded(work: Callable[[], Stats]) -> Stats | int:
    """Run ``work()``; on bad input, a failure or an interrupt say why on stderr and return the exit status.

    SIGTERM is turned into ``SystemExit`` while it runs, so the tools' staging clean-up runs and nothing
    that looks complete is left behind.
    """
    from moc_megatron.data.jsonl import BadInputError, InputError

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    try:
        return work()
    except BadInputError as exc:
        print(f"error: bad input line: {exc}", file=sys.stderr)
        print("(nothing written; use --skip-bad-lines to skip such lines)", file=sys.stderr)
        return EXIT_FAILED
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def print_skipped_and_outputs(stats: RunStats) -> None:
    """The closing lines both tools print: blank and bad lines, and the files written."""
    if stats.blank_lines:
        print(f"  {stats.blank_lines} blank lines ignored", file=sys.stderr)
    if stats.bad_lines:
        print(f"  {stats.bad_lines} bad lines skipped; the first {len(stats.bad_examples)}:", file=sys.stderr)
        for example in stats.bad_examples:
            print(f"    {example}", file=sys.stderr)
    for path in stats.outputs:
        print(f"  wrote {path}", file=sys.stderr)
