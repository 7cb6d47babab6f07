"""Checkpoint layout on disk, the tracker file, and the model signature checked on load.

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
import shutil
import tempfile

from moc_megatron.config import MoCConfig
from moc_megatron.model.builder import ModelSettings
from moc_megatron.training.moc_flags import flag_name

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"

# MoCConfig fields that fix the model's parameters or its computation: a checkpoint and the run
# loading it must agree on all of them.
SIGNATURE_CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "gated_linear_unit", "add_bias_linear", "qk_layernorm",
    "moc_memory_layers", "moc_num_chapters", "moc_chapter_size", "moc_num_shared_chapters", "moc_top_k",
    "moc_num_heads", "moc_num_query_groups", "moc_bank_dim", "moc_routing_unit", "moc_chunk_size",
    "moc_gating", "moc_routed_scaling_factor", "moc_shared_bank",
)
SIGNATURE_SETTINGS_FIELDS = ("vocab_size", "tie_embeddings", "rotary_base")

# Signature entries whose flag is not simply "--" + name with dashes.
_FLAG_OF = {
    "gated_linear_unit": "--swiglu",
    "activation_func": "--swiglu",
    "add_bias_linear": "--disable-bias-linear",
    "vocab_size": "vocabulary: the tokenizer or --vocab-size, padded to --make-vocab-size-divisible-by x TP",
    "tie_embeddings": "--untie-embeddings-and-output-weights",
}


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
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as exc:
        raise RuntimeError(f"{path} holds {text!r}, not an iteration number") from exc


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


def model_signature(config: MoCConfig, settings: ModelSettings) -> dict:
    """The values a checkpoint and the run loading it must agree on."""
    sig = {name: getattr(config, name) for name in SIGNATURE_CONFIG_FIELDS}
    sig["moc_memory_layers"] = sorted(sig["moc_memory_layers"])
    sig["activation_func"] = getattr(config.activation_func, "__name__", str(config.activation_func))
    sig.update({name: getattr(settings, name) for name in SIGNATURE_SETTINGS_FIELDS})
    return sig


def signature_mismatches(saved: dict, current: dict) -> list[str]:
    """One line per disagreeing entry: ``--flag: checkpoint X, this run Y``."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            flag = _FLAG_OF.get(name, flag_name(name))
            lines.append(f"  {flag} ({name}): checkpoint {saved.get(name)!r}, this run {current.get(name)!r}")
    return lines
