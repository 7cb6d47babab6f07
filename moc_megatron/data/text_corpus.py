"""Real English text already on every machine: the documentation that ships inside CPython.

Two sources, both read from the running interpreter's standard library without importing any module
(sources are parsed with :mod:`ast`, so no module code runs):

- the docstrings of the public modules, classes and functions of the standard library (one document
  per module; test packages are skipped);
- ``pydoc_data.topics``: the language reference topics ``help()`` shows (one document per topic).

This text is part of CPython, distributed under the PSF License Agreement (Python Software Foundation
License, SPDX ``PSF-2.0``); see ``LICENSE.txt`` of the Python installation (:func:`cpython_license_path`).
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence

LICENSE_NAME = "PSF-2.0"
LICENSE_TEXT = (
    "CPython documentation and docstrings, Copyright (c) 2001 Python Software Foundation; All Rights Reserved. "
    "Distributed under the PSF License Agreement (PSF-2.0)."
)
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> str:
    """Folder of the running interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def cpython_license_path() -> str | None:
    """CPython's ``LICENSE.txt`` (the PSF License Agreement) if the installation has it."""
    for folder in (stdlib_dir(), sys.base_prefix, os.path.join(sys.base_prefix, "share", "doc", "python3")):
        path = os.path.join(folder, "LICENSE.txt")
        if os.path.isfile(path):
            return path
    return None


def iter_module_files(root: str, modules: Sequence[str] | None = None) -> Iterator[tuple[str, str]]:
    """``(dotted module name, path)`` of the stdlib's ``.py`` files, sorted; ``modules`` limits the top-level names."""
    wanted = set(modules) if modules else None
    found = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in SKIPPED_DIRS or p.startswith("test_") for p in parts):
            dirs[:] = []
            continue
        for name in files:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            dotted = [*parts, name[:-3]]
            if dotted[-1] == "__init__":
                dotted.pop()
            if not dotted or (wanted is not None and dotted[0] not in wanted):
                continue
            found.append((".".join(dotted), os.path.join(folder, name)))
    yield from sorted(found)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # unparse of exotic defaults; the name alone is enough
        return "(...)"


def _describe(body: Sequence[ast.stmt], prefix: str) -> Iterator[str]:
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("_") and node.name != "__init__":
                continue
            qualname = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                header = f"class {qualname}"
            else:
                header = f"{qualname}{_signature(node)}"
            if doc:
                yield f"{header}\n{doc}"
            if isinstance(node, ast.ClassDef):
                yield from _describe(node.body, qualname + ".")


def module_text(dotted: str, path: str) -> str:
    """The module's docstring followed by its public classes' and functions' docstrings ('' if none)."""
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(f"Module {dotted}\n{module_doc}")
    parts.extend(_describe(tree.body, ""))
    return "\n\n".join(parts)


def pydoc_topics(root: str) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py``, read as a literal (empty if absent)."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def text_corpus_documents(
    modules: Sequence[str] | None = None, include_topics: bool = True, min_chars: int = 200, root: str | None = None
) -> Iterator[dict[str, str]]:
    """Documents ``{"id", "text", "source", "license"}``: stdlib modules (sorted), then pydoc topics (sorted)."""
    root = root or stdlib_dir()
    version = f"CPython {sys.version_info.major}.{sys.version_info.minor}"
    for dotted, path in iter_module_files(root, modules):
        text = module_text(dotted, path)
        if len(text) >= min_chars:
            yield {"id": f"stdlib/{dotted}", "text": text, "source": f"{version} docstrings", "license": LICENSE_NAME}
    if include_topics:
        for name, text in sorted(pydoc_topics(root).items()):
            text = text.strip()
            if len(text) >= min_chars:
                source = f"{version} pydoc topics"
                yield {"id": f"topics/{name}", "text": text, "source": source, "license": LICENSE_NAME}
