"""Checkpoint layout on disk, the tracker file, and what ``--load``/``--save`` may point at.

Layout (Megatron-LM's)::

    {save}/latest_checkpointed_iteration.txt     the iteration of the newest complete checkpoint
    {save}/iter_0000100/                          megatron.core.dist_checkpointing, torch_dist format
    {save}/.iter_0000200.partial/                 a save in progress (never named like a checkpoint)

A save writes into the hidden ``.partial`` folder, renames it to ``iter_XXXXXXX`` once every rank has
finished, and only then replaces the tracker file (write to a temporary file, fsync, ``os.replace``). A
crash at any point leaves the tracker on the previous complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from moc_megatron.errors import MoCError
from moc_megatron.platform.megatron_versions import is_complete_checkpoint

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"iter_(\d{7})")


class CheckpointError(MoCError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the folder and the flags."""


class CheckpointNotFoundError(CheckpointError):
    """``--load`` names something that holds no checkpoint but is not empty either."""


class CheckpointOverwriteError(CheckpointError):
    """``--save`` holds checkpoints that this run did not start from and would overwrite."""


def checkpoint_name(iteration: int) -> str:
    """``iter_0000100``."""
    return f"iter_{iteration:07d}"


def checkpoint_path(root: str, iteration: int) -> str:
    """``{root}/iter_0000100``."""
    return os.path.join(root, checkpoint_name(iteration))


def staging_path(root: str, iteration: int) -> str:
    """Where a save in progress is written (hidden, so no tool takes it for a checkpoint)."""
    return os.path.join(root, f".{checkpoint_name(iteration)}.partial")


def read_tracker(root: str) -> int | None:
    """The iteration in ``{root}/latest_checkpointed_iteration.txt``, or ``None`` if there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:  # closed at once (a bare open().read() leaves it to the garbage collector)
        text = f.read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as exc:
        raise RuntimeError(f"{path} holds {text!r}, not an iteration number") from exc


def is_saved_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete ``dist_checkpointing`` save of any supported megatron-core release."""
    return is_complete_checkpoint(path)


def resolve_existing(load: str, iteration: int | None = None, flag: str = "--load") -> tuple[str, int]:
    """``(checkpoint folder, iteration)`` of a checkpoint that must exist (export, evaluation).

    ``iteration`` picks ``{load}/iter_XXXXXXX``; without it ``load`` resolves as :func:`resolve_load` does.
    A missing or empty folder, or an incomplete save, raises :class:`CheckpointNotFoundError`.
    """
    if iteration is not None:
        path = checkpoint_path(load, iteration)
        if not is_saved_checkpoint(path):
            raise CheckpointNotFoundError(f"{flag} {load} --iteration {iteration}: {path} is missing or incomplete")
        return path, iteration
    found = resolve_load(load, flag)
    if found is None:
        raise CheckpointNotFoundError(f"{flag} {load}: missing or empty, no checkpoint to read")
    return found


def resolve_load(load: str, flag: str = "--load", own_save: bool = False) -> tuple[str, int] | None:
    """``(checkpoint folder, iteration)`` for ``--load``, or ``None`` to start from scratch.

    - an empty folder (hidden entries such as an interrupted ``.iter_*.partial`` save do not count), or a
      missing one that is this run's own ``--save`` folder -> ``None``; so is a folder that is this run's
      own ``--save`` (``own_save``) without a checkpoint yet (auto-resume: a job restarted before its first
      save starts over);
    - a folder with ``latest_checkpointed_iteration.txt`` -> the iteration it names;
    - an ``iter_XXXXXXX`` folder holding a complete save -> that iteration;
    - anything else raises :class:`CheckpointNotFoundError` saying what to pass instead.
    A missing folder that is not the run's own ``--save`` folder is an error (a misspelled ``--load``
    would otherwise start from scratch without a word).
    """
    if not os.path.exists(load):
        if own_save:
            return None
        raise CheckpointNotFoundError(
            f"{flag} {load}: no such folder (to start from scratch leave out {flag}; an auto-resuming job gives "
            "--load and --save the same folder)")
    if not os.path.isdir(load):
        raise CheckpointNotFoundError(f"{flag} {load}: not a folder (give a --save folder or an iter_* folder in it)")
    iteration = read_tracker(load)
    if iteration is not None:
        path = checkpoint_path(load, iteration)
        if not is_saved_checkpoint(path):
            raise CheckpointNotFoundError(
                f"{flag} {load}: {TRACKER_FILENAME} names iteration {iteration}, but {path} is missing or incomplete")
        return path, iteration
    match = _ITER_RE.fullmatch(os.path.basename(os.path.normpath(load)))
    if match:
        if not is_saved_checkpoint(load):
            raise CheckpointNotFoundError(f"{flag} {load}: an incomplete checkpoint (no metadata.json or common state)")
        return load, int(match.group(1))
    entries = sorted(e for e in os.listdir(load) if not e.startswith("."))
    if not entries or own_save:
        return None
    iters = [e for e in entries if _ITER_RE.fullmatch(e) and is_saved_checkpoint(os.path.join(load, e))]
    if iters:
        raise CheckpointNotFoundError(
            f"{flag} {load}: no {TRACKER_FILENAME}; to load one of its checkpoints give "
            f"{flag} {os.path.join(load, iters[-1])}")
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise CheckpointNotFoundError(
        f"{flag} {load}: holds files ({shown}) but no checkpoint (no {TRACKER_FILENAME}, no iter_* folder); "
        "give a pretrain_moc.py --save folder, or a new or empty folder to start from scratch")


def saved_iterations(root: str) -> list[int]:
    """The iterations of the complete ``iter_XXXXXXX`` checkpoints in ``root``, in order."""
    if not os.path.isdir(root):
        return []
    found = (_ITER_RE.fullmatch(e) for e in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m and is_saved_checkpoint(os.path.join(root, m.group(0))))


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_save_target(save: str | None, load: str | None, finetune: bool = False) -> None:
    """Refuse to start a run whose ``--save`` folder holds checkpoints it did not start from.

    Allowed: a ``--save`` folder without checkpoints (missing, empty, or only an interrupted save), and
    resuming it (``--load`` of the same folder, or of its newest ``iter_*`` folder). Anything else
    (no ``--load``, another folder, an older ``iter_*`` of it, ``--finetune``) would train from another
    start and overwrite the tracker and later ``iter_*`` folders, so it raises
    :class:`CheckpointOverwriteError` naming what is there and the two ways on. A ``--load`` folder that
    does not exist (and is not ``--save``) raises :class:`CheckpointNotFoundError` here too, before the model
    is built.
    """
    if load is not None and not os.path.exists(load) and not (save is not None and _same_path(load, save)):
        resolve_load(load)  # raises, saying what to give instead
    if save is None or not os.path.isdir(save):
        return
    tracker = read_tracker(save)
    iterations = saved_iterations(save)
    if tracker is None and not iterations:
        return
    newest = max(iterations + ([tracker] if tracker is not None else []))
    where = (f"a checkpoint at iteration {tracker} ({TRACKER_FILENAME})" if tracker is not None
             else f"checkpoints up to iteration {newest} (iter_* folders)")
    ways = f"resume it with --load {save}, or give a new --save folder"
    if load is not None and not finetune:
        if _same_path(load, save):
            return
        match = _ITER_RE.fullmatch(os.path.basename(os.path.normpath(load)))
        if match and _same_path(os.path.dirname(os.path.normpath(load)), save):
            if int(match.group(1)) >= newest:
                return
            raise CheckpointOverwriteError(
                f"--save {save} holds {where}, newer than --load {load}, which this run would overwrite: {ways}")
    if load is None:
        start = "this run starts from scratch (no --load)"
    else:
        start = "--finetune starts at iteration 0" if finetune else f"this run starts from --load {load}"
    raise CheckpointOverwriteError(f"--save {save} already holds {where}, but {start}: {ways}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at ``iteration`` atomically (temp file, fsync, rename, fsync the folder)."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{TRACKER_FILENAME}.")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER_FILENAME))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(root)


def publish_checkpoint(root: str, iteration: int) -> str:
    """Move a finished save from its staging folder to ``iter_XXXXXXX`` and update the tracker (rank 0)."""
    final, staging = checkpoint_path(root, iteration), staging_path(root, iteration)
    if os.path.exists(final):
        # An older complete save of the same iteration (from a run that did not get to its tracker
        # update, or a rerun): the new one replaces it. The tracker does not point at it yet.
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(root)
    write_tracker(root, iteration)
    return final
