"""Writing Megatron indexed datasets (``.bin``/``.idx``) safely, with megatron-core's IndexedDatasetBuilder.

Every output is first written into a hidden temporary folder next to the final files and moved into
place only when the whole run succeeded (:class:`StagedOutputs`). A run that fails or is interrupted
therefore never leaves a ``.bin``/``.idx`` pair that looks complete, and never touches the outputs of an
earlier run. (A run killed with SIGKILL can leave the hidden ``.{name}.tmp-*`` folder behind; it holds
no file under a final name.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def optimal_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """Token dtype for ``vocab_size``: megatron-core's ``DType.optimal_dtype`` rule, without importing it."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def preload() -> None:
    """Import megatron-core's indexed_dataset now (seconds), e.g. once before forking partition processes."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401


class LazyWriter(Generic[T]):
    """Defers writes until megatron-core is imported in a background thread, then does them in order.

    Importing megatron-core takes seconds; meanwhile the main process keeps taking results from the
    workers instead of stalling them. ``open_target`` builds the writers once the import is done.
    """

    def __init__(self, open_target: Callable[[], T]) -> None:
        self._open_target = open_target
        self._thread: threading.Thread | None = None
        self._target: T | None = None
        self._backlog: list[Callable[[T], None]] = []

    def start_import(self) -> None:
        """Start the import thread. Call it only after forking workers: a fork while another thread
        imports could copy a held import lock into the child."""
        self._thread = threading.Thread(target=preload, name="preload-megatron-core", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[T], None]) -> None:
        """Run ``write(target)`` now if the target is open, else once the import is done."""
        self._backlog.append(write)
        if self._target is None and self._thread is not None and self._thread.is_alive():
            return
        self._flush()

    def _flush(self) -> None:
        if self._target is None:
            self._target = self._open_target()
        for write in self._backlog:
            write(self._target)
        self._backlog.clear()

    def close(self) -> T:
        """Do every pending write and return the target."""
        self._flush()
        assert self._target is not None
        return self._target


def open_builder(bin_path: str, dtype: Any) -> Any:
    """A megatron-core ``IndexedDatasetBuilder`` writing ``bin_path`` (``dtype``: numpy type or its name)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(bin_path, dtype=np.dtype(dtype).type)


def add_documents(builder: Any, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Append one single-sequence document per entry of ``lengths``, taken in order from ``tokens``."""
    offset = 0
    for length in lengths.tolist():
        builder.add_document(tokens[offset : offset + length], [length])
        offset += length


def finalize(builder: Any, prefix: str) -> None:
    """Close ``builder``'s ``.bin`` and write ``prefix.idx``."""
    builder.finalize(prefix + ".idx")


def merge(prefixes: Sequence[str], out_prefix: str, dtype: Any) -> None:
    """Concatenate indexed datasets, in order, into ``out_prefix``."""
    builder = open_builder(out_prefix + ".bin", dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    finalize(builder, out_prefix)


class StagedOutputs:
    """A hidden temporary folder beside the outputs; :meth:`commit` moves staged files to their final names.

    Use as a context manager: the folder is removed on exit, whether or not the run succeeded.
    """

    def __init__(self, output_prefix: str) -> None:
        self.final_dir = os.path.dirname(os.path.abspath(output_prefix))
        self._name = os.path.basename(output_prefix) or "out"
        self.tmp_dir = ""
        self._staged: list[tuple[str, str]] = []

    def __enter__(self) -> StagedOutputs:
        # The folder is created here, with its path known before it exists: a SIGTERM (turned into SystemExit
        # by the tools) that lands just after the mkdir still removes it. mkdtemp, by contrast, could be
        # interrupted between creating the folder and returning its name, and before `with` calls __exit__.
        os.makedirs(self.final_dir, exist_ok=True)
        try:
            while True:
                self.tmp_dir = os.path.join(self.final_dir, f".{self._name}.tmp-{secrets.token_hex(6)}")
                try:
                    os.mkdir(self.tmp_dir, 0o700)
                    break
                except FileExistsError:  # another run's folder: never ours to remove
                    self.tmp_dir = ""
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def stage(self, final_path: str) -> str:
        """Temporary path to write instead of ``final_path``; it is moved there by :meth:`commit`."""
        tmp_path = os.path.join(self.tmp_dir, f"{len(self._staged)}_{os.path.basename(final_path)}")
        self._staged.append((tmp_path, final_path))
        return tmp_path

    def stage_dataset(self, final_prefix: str) -> str:
        """Temporary prefix to write an indexed dataset to instead of ``final_prefix``."""
        tmp_prefix = os.path.join(self.tmp_dir, f"{len(self._staged)}_{os.path.basename(final_prefix)}")
        self._staged.append((tmp_prefix + ".bin", final_prefix + ".bin"))
        self._staged.append((tmp_prefix + ".idx", final_prefix + ".idx"))
        return tmp_prefix

    def scratch(self, name: str) -> str:
        """A path in the temporary folder for intermediate files that are never committed."""
        return os.path.join(self.tmp_dir, name)

    def commit(self) -> list[str]:
        """Move every staged file into place; ``.idx`` files last, so a pair is complete only at the end."""
        for _, final in self._staged:
            if final.endswith(".idx") and os.path.exists(final):
                # An older idx beside a half-replaced bin would look like a complete dataset.
                os.unlink(final)
        ordered = sorted(self._staged, key=lambda pair: pair[1].endswith(".idx"))
        for tmp, final in ordered:
            os.replace(tmp, final)
        return [final for _, final in self._staged]

    def cleanup(self) -> None:
        """Remove the temporary folder and whatever is left in it."""
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
