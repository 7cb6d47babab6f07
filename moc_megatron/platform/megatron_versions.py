"""Every difference between the megatron-core releases this project supports, and nothing else.

Supported: megatron-core 0.16.1 (Python 3.11, the development stack) through 0.19.x (Python 3.12, NVIDIA's
containers); CI runs the suite on 0.16.1 and on the newest release. Each difference is keyed by the release
that introduced it (``since(...)``), named after what changed, and tested in tests/unit/test_megatron_versions.py:

- ``MOE_METRICS_TRACKER`` (0.18): the MoE aux-loss tracker became a ``MoEMetricsTracker`` object;
  ``get_moe_layer_wise_logging_tracker()`` returns a fresh dict copy, so entries can no longer be removed
  through it. :func:`record_aux_loss`, :func:`aux_loss_values` and :func:`forget_aux_losses` work on both.
- ``COMMON_STATE_IN_DISTCP`` (0.19): ``dist_checkpointing.save`` stores the common (non-sharded) state as the
  sharded object ``common_state`` inside the ``*.distcp`` files instead of ``common.pt``. 0.19 reads both
  layouts; :func:`adapt_common_state_loading` teaches older releases to read the new one, and
  :func:`read_common_state` / :func:`is_complete_checkpoint` read either without building a model.
- ``MLP_SUBMODULE_BUILDER`` (0.18): a layer's ``mlp`` slot is a builder (``MLP.as_mlp_submodule``); a
  ``ModuleSpec(module=MLP)`` is rewrapped with a warning at every layer spec. :func:`mlp_submodule` gives
  each release its own form.
- ``INTERNAL_NOTICES`` (0.19): ``dist_checkpointing.save`` (synchronous) runs megatron-core's own async
  writer and logs "MCore's async save is deprecated" on every run; ``GPTModel`` logs that it is deprecated
  in favour of ``HybridModel``. Neither concerns a user
  (the sync save is the built-in path; moving the model to ``HybridModel`` is ours to do), so
  :func:`quiet_internal_notices` drops exactly those two log lines.
- ``PARAM_GROUPS_MATCHED_BY_SCHEDULE`` (0.19): optimizer param groups in a checkpoint are matched to the
  run's by the scheduler keys too (``max_lr``, ``min_lr``, ``start_wd``, ``end_wd``, ``optimizer``), so a run
  whose ``--lr`` differs cannot load the optimizer; :func:`align_saved_param_groups` makes the saved groups
  and the run's agree on the keys the scheduler owns (the scheduler itself is checked against the flags
  before, with this project's one-line error).
- Full CUDA-graph scope (every supported release): the default scope is the string ``"full"``, which
  ``TransformerConfig.__post_init__`` replaces by the empty list (the same: the whole layer) with the warning
  "full scope is deprecated" on every config built; the field is ``cuda_graph_scope`` on 0.16.1 and
  ``cuda_graph_modules`` on 0.19. :func:`empty_full_cuda_graph_scope` makes that replacement first, silently.
- Torch's notices on a checkpoint load: on 0.16.1 ``dist_checkpointing.load`` calls torch's deprecated
  ``checkpoint.load_state_dict`` (a FutureWarning on every load); 0.19 calls ``checkpoint.load`` with
  positional arguments ("The argument order of load has been changed") and, in a process without a process
  group (evaluation, export), torch notes that it assumes one process. :func:`load_dist_checkpoint` loads
  without these notices on any release; they are about megatron-core's calls, not the caller's.

Checkpoints: one saved by 0.16-0.18 (``common.pt``) loads on 0.19 as shipped; one saved by 0.19 loads on
0.16-0.18 through :func:`adapt_common_state_loading` (applied by ``init_platform()``).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from collections.abc import Iterable

import megatron.core
import torch
from packaging.version import Version

MEGATRON_CORE_VERSION = Version(megatron.core.__version__)
OLDEST_SUPPORTED = Version("0.16.1")
NEWEST_TESTED = Version("0.19.2")
FIRST_UNSUPPORTED = Version("0.20")
SUPPORTED_RANGE = f">={OLDEST_SUPPORTED},<{FIRST_UNSUPPORTED}"

MOE_METRICS_TRACKER = "0.18"
MLP_SUBMODULE_BUILDER = "0.18"
COMMON_STATE_IN_DISTCP = "0.19"
PARAM_GROUPS_MATCHED_BY_SCHEDULE = "0.19"

# (logger, start of the message) of the megatron-core notices dropped by quiet_internal_notices(); both
# appeared in 0.19, and the filters are harmless on releases that never log them.
INTERNAL_NOTICES = (
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
)

COMMON_STATE_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", None, (1,), (0,)).unique_key
_DCP_METADATA_FILE = ".metadata"
SCHEDULER_OWNED_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")

_warned = False


def since(release: str, version: Version | str | None = None) -> bool:
    """Whether the installed megatron-core (or ``version``) is ``release`` or newer."""
    installed = MEGATRON_CORE_VERSION if version is None else Version(str(version))
    return Version(installed.base_version) >= Version(release)


def is_supported(version: Version | str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in :data:`SUPPORTED_RANGE`."""
    v = Version((MEGATRON_CORE_VERSION if version is None else Version(str(version))).base_version)
    return OLDEST_SUPPORTED <= v < FIRST_UNSUPPORTED


def check_supported(version: Version | str | None = None) -> bool:
    """Warn once per process when megatron-core lies outside :data:`SUPPORTED_RANGE`; return whether inside."""
    global _warned
    if is_supported(version):
        return True
    if not _warned:
        _warned = True
        found = MEGATRON_CORE_VERSION if version is None else version
        warnings.warn(
            f"megatron-core {found} is installed; moc-megatron supports {SUPPORTED_RANGE} (tested: 0.16.1, "
            f"{NEWEST_TESTED}). Run tests/unit/test_megatron_versions.py and the checkpoint tests, and add the "
            "differences to moc_megatron/platform/megatron_versions.py.", RuntimeWarning, stacklevel=2)
    return False


# --- layer specs (0.18) and log notices (0.19) ---------------------------------------------------------

def mlp_submodule(submodules: object, module: type | None = None) -> object:
    """The ``mlp`` entry of a ``TransformerLayerSubmodules`` for ``module`` (default: megatron's ``MLP``)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    module = MLP if module is None else module
    if since(MLP_SUBMODULE_BUILDER):
        return functools.partial(module.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=module, submodules=submodules)


class _DropNotice(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_internal_notices() -> None:
    """Drop the megatron-core log lines in :data:`INTERNAL_NOTICES` (idempotent; any release)."""
    for logger_name, prefix in INTERNAL_NOTICES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


# --- CUDA graph scope (every release) ---------------------------------------------------------------------

CUDA_GRAPH_SCOPE_FIELDS = ("cuda_graph_modules", "cuda_graph_scope")  # 0.19's name, the older one


def empty_full_cuda_graph_scope(config: object) -> None:
    """Replace a ``"full"`` CUDA-graph scope of a ``TransformerConfig`` by ``[]`` before its ``__post_init__``.

    megatron-core makes the same replacement itself, warning that ``"full"`` (its own default) is deprecated;
    done here first, a config built with the defaults warns nothing. Other values are left as given.
    """
    for name in CUDA_GRAPH_SCOPE_FIELDS:
        if getattr(config, name, None) == "full":
            setattr(config, name, [])


# --- MoE aux-loss tracker (0.18) -------------------------------------------------------------------------

def record_aux_loss(name: str, value: torch.Tensor, layer_number: int, num_layers: int) -> None:
    """Add ``value`` to the aux-loss tracker's entry ``name`` at ``layer_number`` (1-based)."""
    if since(MOE_METRICS_TRACKER):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().record(name=name, value=value, layer_number=layer_number, num_layers=num_layers)
    else:
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        save_to_aux_losses_tracker(name, value, layer_number, num_layers)


def aux_loss_values(name: str) -> torch.Tensor | None:
    """The tracker's live per-layer values of ``name`` (zeroing them resets the entry), or ``None``."""
    if since(MOE_METRICS_TRACKER):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        entry = get_moe_metrics_tracker().metrics.get(name)
        return None if entry is None else entry.values
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get(name)
    return None if entry is None else entry["values"]


def forget_aux_losses(names: Iterable[str]) -> None:
    """Remove the tracker entries ``names`` (their size is the model's layer count; a later model may differ)."""
    if since(MOE_METRICS_TRACKER):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        tracker = get_moe_metrics_tracker().metrics  # the tracker's own dict, not a copy
    else:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
    for name in names:
        tracker.pop(name, None)


# --- common state of a dist checkpoint (0.19) ------------------------------------------------------------

def is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` holds a finished ``torch_dist`` save of any supported release.

    ``metadata.json`` is written last by every release; the common state is ``common.pt`` (before 0.19) or
    inside the ``*.distcp`` files, indexed by torch's ``.metadata`` (0.19).
    """
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        return False
    return any(os.path.isfile(os.path.join(path, name)) for name in (COMMON_STATE_FILE, _DCP_METADATA_FILE))


def _read_distcp_common_state(path: str) -> dict:
    """The ``common_state`` sharded object of a 0.19 save, read in this one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    reader = FileSystemReader(path)
    if COMMON_STATE_KEY not in reader.read_metadata().state_dict_metadata:
        raise FileNotFoundError(f"{path}: no {COMMON_STATE_FILE} and no common state in its .distcp files")
    holder: dict[str, object] = {COMMON_STATE_KEY: io.BytesIO()}
    with warnings.catch_warnings():  # one process reading on purpose; torch notes that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp_load(holder, storage_reader=reader, no_dist=True)
    loaded = holder[COMMON_STATE_KEY]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, map_location="cpu", weights_only=False)
    # megatron-core stores sharded objects as a one-element list (its ShardedObject data wrapper).
    return loaded[0] if isinstance(loaded, list | tuple) else loaded


def read_common_state(path: str) -> dict:
    """The common state dict of the checkpoint folder ``path``, saved by any supported release.

    Raises ``FileNotFoundError`` when the folder holds neither layout.
    """
    legacy = os.path.join(path, COMMON_STATE_FILE)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=False)
    if not os.path.isfile(os.path.join(path, _DCP_METADATA_FILE)):
        raise FileNotFoundError(f"{path}: neither {COMMON_STATE_FILE} nor a torch_dist .metadata file")
    return _read_distcp_common_state(path)


def adapt_common_state_loading() -> bool:
    """Before 0.19: make ``dist_checkpointing.load``/``load_common_state_dict`` read a 0.19 save (idempotent).

    dist_checkpointing/strategies/common.py ``TorchCommonLoadStrategy.load_common`` reads only ``common.pt``;
    when it is missing the common state is read from the ``*.distcp`` files instead. Returns whether an
    adaptation was needed (False on 0.19 and newer, which read both layouts).
    """
    if since(COMMON_STATE_IN_DISTCP):
        return False
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    shipped = TorchCommonLoadStrategy.load_common
    if getattr(shipped, "_moc_reads_distcp", False):
        return True

    def load_common(self: TorchCommonLoadStrategy, checkpoint_dir: str | os.PathLike) -> dict:
        if os.path.isfile(os.path.join(checkpoint_dir, COMMON_STATE_FILE)):
            return shipped(self, checkpoint_dir)
        return _read_distcp_common_state(os.fspath(checkpoint_dir))

    load_common._moc_reads_distcp = True  # type: ignore[attr-defined]
    TorchCommonLoadStrategy.load_common = load_common
    return True


def load_dist_checkpoint(sharded_state_dict: dict, path: str) -> dict:
    """``dist_checkpointing.load(sharded_state_dict, path)`` without torch's notices about the way megatron-core
    calls it (0.16.1: the deprecated ``load_state_dict``; 0.19: positional arguments, and one process)."""
    from megatron.core import dist_checkpointing

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"The argument order of load has been changed", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        return dist_checkpointing.load(sharded_state_dict, path)


# --- optimizer param-group matching on load (0.19) -----------------------------------------------------

def align_saved_param_groups(optimizer: object, saved_state: dict,
                             keep_checkpoint_values: bool = False) -> int:
    """Make the saved and the run's param groups agree on the scheduler-owned keys (0.19 and newer).

    ``saved_state`` is the optimizer entry of a loaded checkpoint, before ``optimizer.load_state_dict``.
    Groups are paired by what identified them before 0.19 (``wd_mult``, ``lr_mult``,
    ``is_expert_parallel``, ``is_decoupled_lr``). The run's values win (``--override-opt_param-scheduler``,
    or values the flags already agree on) unless ``keep_checkpoint_values``
    (``--use-checkpoint-opt_param-scheduler``), when the run's groups take the checkpoint's, as loading the
    groups did before 0.19. Returns the number of values changed.
    """
    if not since(PARAM_GROUPS_MATCHED_BY_SCHEDULE):
        return 0
    structural = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")

    def key(group: dict) -> tuple:
        return tuple(group.get(k) for k in structural)

    current = {key(g): g for g in _param_groups(optimizer)}
    changed = 0
    for saved in _saved_param_groups(saved_state):
        mine = current.get(key(saved))
        if mine is None:
            continue
        for name in SCHEDULER_OWNED_GROUP_KEYS:
            if name not in mine or name not in saved or saved[name] == mine[name]:
                continue
            if keep_checkpoint_values:
                mine[name] = saved[name]
            else:
                saved[name] = mine[name]
            changed += 1
    return changed


def _param_groups(optimizer: object) -> list[dict]:
    """Param groups of a megatron optimizer, a ``ChainedOptimizer`` of them, or a torch optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [g for opt in chained for g in _param_groups(opt)]
    inner = getattr(optimizer, "optimizer", None)
    groups = getattr(inner if inner is not None else optimizer, "param_groups", None)
    return list(groups or [])


def _saved_param_groups(state: object) -> list[dict]:
    """Every ``param_groups`` list entry anywhere in a (chained, distributed) optimizer state dict."""
    found: list[dict] = []
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(groups, list):
            found.extend(g for g in groups if isinstance(g, dict))
        for name, value in state.items():
            if name != "param_groups":
                found.extend(_saved_param_groups(value))
    elif isinstance(state, list | tuple):
        for value in state:
            found.extend(_saved_param_groups(value))
    return found
