"""``--moc-*`` command-line flags generated from :class:`MoCConfig`'s ``moc_`` fields (``pretrain_moc.py``,
``finetune_moc.py``, and ``convert_checkpoint.py import`` for the memory a dense model gets).

One flag per field: ``moc_num_chapters`` -> ``--moc-num-chapters``, its help text is the field's
docstring, its type comes from the annotation (``list[int]`` -> several ints, ``Literal`` -> choices,
``bool`` -> ``--moc-x/--no-moc-x``). The defaults stay ``None`` so that a preset, and then
``MoCConfig`` itself, supply the value when the flag is not given. The memory's optimisation flags
(``--moc-memory-lr``, ``--moc-bank-lr``, ``--moc-memory-weight-decay``, ``--moc-bank-weight-decay``,
``--moc-freeze-bank``) are not model configuration and are added by
:func:`add_moc_training_flags`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from moc_megatron import config as config_module
from moc_megatron.config import MoCConfig

MOC_PREFIX = "moc_"


def moc_fields() -> list[dataclasses.Field]:
    """The ``moc_`` fields of :class:`MoCConfig`, in declaration order."""
    return [f for f in dataclasses.fields(MoCConfig) if f.name.startswith(MOC_PREFIX)]


def field_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each annotated field) of a dataclass body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # the class definition's statements
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def _resolve(annotation: Any) -> Any:
    """The annotation as a typing object (``from __future__ import annotations`` leaves strings)."""
    if isinstance(annotation, str):
        return eval(annotation, vars(config_module), vars(typing))  # noqa: S307 (our own source)
    return annotation


def _argparse_kwargs(annotation: Any) -> dict[str, Any]:
    """``type``/``nargs``/``choices``/``action`` for one field annotation."""
    tp = _resolve(annotation)
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [p for p in params if p is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union annotation {annotation!r}")
        return _argparse_kwargs(inner[0])
    if origin is typing.Literal:
        return {"type": type(params[0]), "choices": list(params)}
    if origin is list:
        return {"type": params[0], "nargs": "*"}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"no command-line form for annotation {annotation!r}")


def flag_name(field_name: str) -> str:
    """``moc_top_k`` -> ``--moc-top-k``."""
    return "--" + field_name.replace("_", "-")


def add_moc_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one ``--moc-*`` flag per ``moc_`` field of :class:`MoCConfig` (default ``None``: not given)."""
    group = parser.add_argument_group("memory (Mixture of Chapters)")
    docs = field_docstrings(MoCConfig)
    for f in moc_fields():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{docs.get(f.name, '')} [MoCConfig default: {default!r}]"
        if f.name == "moc_bank_seed":
            help_text = f"{docs.get(f.name, '')} [default: --seed]"
        group.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text,
                           **_argparse_kwargs(f.type))


def add_moc_training_flags(parser: argparse.ArgumentParser) -> None:
    """Memory-specific optimisation flags (not model configuration)."""
    group = parser.add_argument_group("memory optimisation")
    group.add_argument("--moc-memory-lr", type=float, default=None,
                       help="Peak learning rate of the memory layers (memory read, router, its norm); "
                            "default --lr. Their minimum LR is --min-lr scaled by the same ratio.")
    group.add_argument("--moc-bank-lr", type=float, default=None,
                       help="Peak learning rate of the memory bank; default --lr. Its minimum LR is --min-lr "
                            "scaled by the same ratio.")
    group.add_argument("--moc-memory-weight-decay", type=float, default=None,
                       help="Weight decay of the memory layers' matrices (W_Q/W_K/W_V/W_O, router); default "
                            "--weight-decay. Applied as a multiple of --weight-decay (which must be > 0), so a "
                            "--start/--end-weight-decay schedule scales by the same ratio.")
    group.add_argument("--moc-bank-weight-decay", type=float, default=None,
                       help="Weight decay of the memory bank; default --weight-decay. Applied as a multiple of "
                            "--weight-decay (which must be > 0), as --moc-memory-weight-decay.")
    group.add_argument("--moc-freeze-bank", action="store_true",
                       help="Keep the memory bank fixed: no gradient, no optimizer state for it.")


def moc_config_kwargs(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The ``moc_`` fields that ``flags`` (argument name -> value) set; unset ones (``None``) are left out, so
    they fall back to MoCConfig's defaults."""
    kwargs = {}
    for f in moc_fields():
        value = flags.get(f.name)
        if value is not None:
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
    return kwargs
