"""The base class of the errors this package raises for bad input.

Every error type of ``moc_megatron`` derives from :class:`MoCError` (and from the built-in type it
always had, ``ValueError`` or ``RuntimeError``, so callers that catch those still do). Its message says
what is wrong and where in one or two lines; the entry scripts print it without a traceback
(:func:`moc_megatron.training.errors.run_entry_point`).
"""

from __future__ import annotations


class MoCError(Exception):
    """Bad input (flags, files, checkpoints, data) or a run state the user must act on; not a bug."""
