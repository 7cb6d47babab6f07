"""Reading jsonl corpora: input expansion, strict line parsing, and chunked reading for worker pools.

Inputs are ``.jsonl`` or ``.jsonl.gz`` files, given as one file, a glob, or a directory (searched
recursively for ``*.jsonl`` and ``*.jsonl.gz``). Files are always taken in sorted order so the output
of every tool is deterministic.

Line policy (shared by all tools): a line holding only whitespace is ignored and counted as blank;
every other line must be valid UTF-8 holding one JSON object. Anything else is a :class:`BadLine`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from moc_megatron.errors import MoCError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class BadLine(MoCError, ValueError):
    """A jsonl line that cannot be used; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InputError(MoCError, ValueError):
    """The ``--input`` specification names no readable jsonl file."""


def expand_inputs(spec: str) -> list[str]:
    """Files named by ``spec``: an existing file, a directory (recursive), or a glob; sorted."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        found = []
        for root, _, names in os.walk(spec):
            found.extend(os.path.join(root, n) for n in names if n.endswith(JSONL_SUFFIXES))
        if not found:
            raise InputError(f"directory {spec!r} has no *.jsonl or *.jsonl.gz file")
        return sorted(found)
    matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not matched:
        raise InputError(f"--input {spec!r} matches no file")
    return matched


def is_gzip(path: str) -> bool:
    """Whether ``path`` is read through gzip (by its ``.gz`` suffix)."""
    return path.endswith(".gz")


def open_input(path: str) -> BinaryIO:
    """Open a jsonl file for binary reading, decompressing ``.gz``."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def parse_object(raw: bytes) -> dict[str, Any] | None:
    """Parse one line; ``None`` for a blank line, :class:`BadLine` for anything unusable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"invalid UTF-8 at byte {exc.start}: {exc.reason}") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line is a JSON {type(obj).__name__}, expected an object")
    return obj


def get_text(obj: dict[str, Any], key: str) -> str:
    """The string under ``key``; :class:`BadLine` when it is missing, not a string, or not encodable."""
    if key not in obj:
        raise BadLine(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadLine(f"key {key!r} holds a {type(value).__name__}, expected a string")
    return value


def check_encodable(text: str, key: str) -> None:
    """:class:`BadLine` when ``text`` holds a lone surrogate (JSON ``\\ud800`` escapes), which is not Unicode."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadLine(f"key {key!r} holds invalid Unicode (lone surrogate at character {exc.start})") from None


def iter_texts(paths: Sequence[str], key: str) -> Iterator[str]:
    """Every ``key`` string of every line, in order; raises :class:`BadLine` with ``file:line`` on a bad line."""
    for path in paths:
        with open_input(path) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    obj = parse_object(raw)
                    if obj is None:
                        continue
                    text = get_text(obj, key)
                    check_encodable(text, key)
                except BadLine as exc:
                    raise BadLine(f"{path}:{lineno}: {exc.reason}") from None
                yield text


@dataclass(frozen=True)
class Segment:
    """A contiguous run of whole lines of one file: bytes ``[start, end)`` (``end=None``: to the end)."""

    path: str
    start: int = 0
    end: int | None = None

    def first_line_number(self) -> int:
        """1-based line number of the segment's first line (counts newlines before ``start``)."""
        if self.start == 0:
            return 1
        count = 0
        with open(self.path, "rb") as f:
            remaining = self.start
            while remaining:
                block = f.read(min(remaining, 1 << 24))
                if not block:
                    break
                count += block.count(b"\n")
                remaining -= len(block)
        return count + 1


def _line_start_at_or_after(f: BinaryIO, offset: int) -> int:
    """Offset of the first line start at or after ``offset``."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def plan_partitions(paths: Sequence[str], partitions: int) -> list[list[Segment]]:
    """Split the concatenated inputs into ``partitions`` contiguous runs of whole lines, balanced by bytes.

    Plain files are cut at line starts; a gzip file cannot be cut, so it goes whole to one partition.
    Concatenating the partitions in order gives back every line exactly once, in input order.
    """
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    bounds = [total * i // partitions for i in range(partitions + 1)]
    plan: list[list[Segment]] = [[] for _ in range(partitions)]
    file_offset = 0
    for path, size in zip(paths, sizes):
        file_end = file_offset + size
        if is_gzip(path):
            # Assign by the byte at the file's middle to keep the partitions balanced.
            middle = file_offset + size // 2
            part = max(i for i in range(partitions) if bounds[i] <= middle) if size else 0
            plan[part].append(Segment(path))
        else:
            with open(path, "rb") as f:
                for part in range(partitions):
                    lo = max(bounds[part], file_offset) - file_offset
                    hi = min(bounds[part + 1], file_end) - file_offset
                    if hi <= lo:
                        continue
                    start = _line_start_at_or_after(f, lo)
                    end = _line_start_at_or_after(f, hi) if hi < size else size
                    if end > start:
                        plan[part].append(Segment(path, start, end))
        file_offset = file_end
    return plan


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one segment: ``data`` is ``line_count`` lines read from ``segment_index``."""

    segment_index: int
    first_line: int
    """0-based index of the chunk's first line within its segment."""
    data: bytes


def iter_chunks(segments: Sequence[Segment], chunk_bytes: int) -> Iterator[tuple[Chunk, int]]:
    """Read segments as chunks of about ``chunk_bytes`` bytes of whole lines.

    Yields ``(chunk, disk_bytes)``: the second value counts bytes read from disk (compressed bytes for
    gzip), for progress. Lines are never split, and a last line without a newline gets one.
    """
    for index, segment in enumerate(segments):
        with open_input(segment.path) as f:
            disk = getattr(f, "fileobj", None) or f  # gzip: count compressed bytes
            f.seek(segment.start)
            end = segment.end
            line = 0
            last_disk = disk.tell()
            while True:
                pos = f.tell()
                if end is not None and pos >= end:
                    break
                data = f.read(chunk_bytes if end is None else min(chunk_bytes, end - pos))
                if not data:
                    break
                if not data.endswith(b"\n"):
                    # the segment end is a line start, so completing the line never crosses it
                    data += f.readline()
                    if not data.endswith(b"\n"):
                        data += b"\n"
                yield Chunk(index, line, data), disk.tell() - last_disk
                last_disk = disk.tell()
                line += data.count(b"\n")


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Write records as jsonl (gzip for ``.gz``) under a temporary name, renamed on success; returns the count."""
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=out_dir)
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if is_gzip(path) else raw  # type: ignore[assignment]
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                count += 1
            if f is not raw:
                f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count


class BadInputError(MoCError, ValueError):
    """A bad input line stopped the run (``--skip-bad-lines`` not given); the message is ``file:line: reason``."""


MAX_BAD_EXAMPLES = 20


class BadLineLog:
    """Turns a worker's ``(chunk, line in chunk, reason)`` into ``file:line: reason`` and stops or counts."""

    def __init__(self, segments: Sequence[Segment], skip: bool) -> None:
        self.segments = segments
        self.skip = skip
        self.count = 0
        self.examples: list[str] = []
        self._first_lines: dict[int, int] = {}

    def where(self, chunk: Chunk, line_in_chunk: int) -> str:
        """``path:line`` of a line of ``chunk``."""
        index = chunk.segment_index
        if index not in self._first_lines:
            self._first_lines[index] = self.segments[index].first_line_number()
        return f"{self.segments[index].path}:{self._first_lines[index] + chunk.first_line + line_in_chunk}"

    def report(self, chunk: Chunk, line_in_chunk: int, reason: str) -> None:
        """Raise :class:`BadInputError`, or (with ``skip``) count the line and keep the first examples."""
        message = f"{self.where(chunk, line_in_chunk)}: {reason}"
        if not self.skip:
            raise BadInputError(message)
        self.count += 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(message)
