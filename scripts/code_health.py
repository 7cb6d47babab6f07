"""Structure report of ``moc_megatron/``: import cycles, functions taking an ``argparse.Namespace``, longest functions.

    python scripts/code_health.py            # all three reports
    python scripts/code_health.py cycles     # one of: cycles, namespace, longest

Imports are read from the source with ``ast`` (module-level, inside functions and under ``TYPE_CHECKING``
alike: a lazy import still ties two modules together). ``from package import name`` is an edge to the
package's ``__init__`` (Python runs it first), and also to the submodule ``package.name`` when that file exists.
Package cycles are the same graph with every module replaced by its subpackage (``memory``, ``model``, ...).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moc_megatron"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` (packages by their ``__init__``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, is_package)
            if source in modules:
                found.add(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
    found.discard(module)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = module_files(root, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def package_graph(graph: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
    """The import graph between the subpackages (``moc_megatron.memory`` stands for all its modules)."""

    def owner(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(owner(module), set())
        edges.update(owner(t) for t in targets if owner(t) != owner(module))
    for targets in list(packages.values()):
        for target in targets:
            packages.setdefault(target, set())
    return packages


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each is at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _cycles_from(graph: dict[str, set[str]], start: str, allowed: set[str]) -> Iterator[list[str]]:
    """Elementary cycles through ``start`` whose other modules are in ``allowed``."""
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        for succ in sorted(graph[node] & allowed, reverse=True):
            if succ == start:
                yield path + [start]
            elif succ not in path:
                stack.append((succ, path + [succ]))


def simple_cycles(graph: dict[str, set[str]], component: list[str]) -> list[list[str]]:
    """Every elementary cycle inside one component, each starting at its smallest module name."""
    members = set(component)
    cycles = []
    for start in sorted(component):
        cycles.extend(sorted(_cycles_from(graph, start, {m for m in members if m >= start})))
    return cycles


def import_cycles(root: Path = ROOT, package: str = PACKAGE) -> list[list[str]]:
    """All elementary import cycles among the package's modules (``a -> b -> a`` as ``[a, b, a]``)."""
    graph = import_graph(root, package)
    return [c for comp in strongly_connected(graph) for c in simple_cycles(graph, comp)]


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def namespace_functions(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """``module:function`` of every function with a parameter annotated with ``Namespace``."""
    found = []
    for name, path in module_files(root, package).items():
        for fn in _functions(ast.parse(path.read_text())):
            params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            if any(p.annotation is not None and "Namespace" in ast.unparse(p.annotation) for p in params):
                found.append(f"{name}:{fn.name}")
    return found


# Where an argparse.Namespace belongs: parsing the command line and turning it into the RunConfig.
ARGUMENT_PARSING_MODULES = ("training.arguments", "training.validate_args", "training.config_from_args")
ARGUMENT_PARSING_FUNCTIONS = ("training.finetune:validate_finetune_args",)


def is_argument_parsing(function: str, package: str = PACKAGE) -> bool:
    """Whether ``module:function`` (as :func:`namespace_functions` names it) parses or validates the command line."""
    name = function.removeprefix(package + ".")
    return name.split(":")[0] in ARGUMENT_PARSING_MODULES or name in ARGUMENT_PARSING_FUNCTIONS


def longest_functions(count: int = 15, root: Path = ROOT, package: str = PACKAGE) -> list[tuple[int, str]]:
    """The ``count`` longest functions (lines from ``def`` to the last statement) as ``(lines, module:function)``."""
    sizes = []
    for name, path in module_files(root, package).items():
        for fn in _functions(ast.parse(path.read_text())):
            sizes.append((fn.end_lineno - fn.lineno + 1, f"{name}:{fn.name}"))
    return sorted(sizes, key=lambda s: (-s[0], s[1]))[:count]


def main(argv: list[str] | None = None) -> int:
    """Print the reports asked for; the exit status is 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", choices=["cycles", "namespace", "longest", []], default=[])
    reports = parser.parse_args(argv).reports or ["cycles", "namespace", "longest"]
    if "cycles" in reports:
        graph = import_graph()
        components = strongly_connected(graph)
        cycles = [c for comp in components for c in simple_cycles(graph, comp)]
        print(f"import cycles: {len(cycles)} (in {len(components)} groups of modules)")
        for cycle in cycles:
            print("  " + " -> ".join(m.removeprefix(PACKAGE + ".") for m in cycle))
        packages = package_graph(graph)
        package_cycles = [c for comp in strongly_connected(packages) for c in simple_cycles(packages, comp)]
        print(f"subpackage import cycles: {len(package_cycles)}")
        for cycle in package_cycles:
            print("  " + " -> ".join(m.removeprefix(PACKAGE + ".") for m in cycle))
    if "namespace" in reports:
        functions = namespace_functions()
        outside = [fn for fn in functions if not is_argument_parsing(fn)]
        print(f"functions with a Namespace parameter: {len(functions)} ({len(outside)} outside argument parsing)")
        for fn in functions:
            where = "" if is_argument_parsing(fn) else "   <- outside argument parsing"
            print("  " + fn.removeprefix(PACKAGE + ".") + where)
    if "longest" in reports:
        print("longest functions:")
        for lines, fn in longest_functions():
            print(f"  {lines:4d}  {fn.removeprefix(PACKAGE + '.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
