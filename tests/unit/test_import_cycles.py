"""Code structure: no import cycles in moc_megatron (lazy and type-only imports count), and the command line
is an argparse.Namespace only while it is parsed."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("code_health", ROOT / "scripts" / "code_health.py")
code_health = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_health)


def test_no_import_cycles():
    cycles = code_health.import_cycles()
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_lazy_and_package_cycles(tmp_path):
    """A broken package: ``a`` imports ``b`` inside a function, ``b`` imports ``a``; ``pkg/__init__`` imports
    ``c``, which imports its own package."""
    files = {
        "pkg/__init__.py": "from pkg.c import x\n",
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "from pkg.a import f\n",
        "pkg/c.py": "from pkg import a\nx = 1\n",
        "pkg/d.py": "import pkg.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    cycles = code_health.import_cycles(tmp_path, "pkg")
    assert ["pkg", "pkg.c", "pkg"] in cycles
    assert ["pkg.a", "pkg.b", "pkg.a"] in cycles
    assert not any("pkg.d" in c for c in cycles)


def test_only_argument_parsing_takes_a_namespace():
    """Past parsing and validation the command line is a RunConfig: no other function takes an argparse.Namespace."""
    outside = [fn for fn in code_health.namespace_functions() if not code_health.is_argument_parsing(fn)]
    assert outside == []


def test_no_import_cycles_between_subpackages():
    """``memory`` does not import ``model``, which imports ``memory``; no other pair of subpackages loops either."""
    packages = code_health.package_graph(code_health.import_graph())
    cycles = [c for comp in code_health.strongly_connected(packages) for c in code_health.simple_cycles(packages, comp)]
    assert cycles == [], "subpackage import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert "moc_megatron.model" not in packages["moc_megatron.memory"]
