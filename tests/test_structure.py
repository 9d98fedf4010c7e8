"""The package's shape: no module over 650 lines, no import cycles.

The import graph is read from the source (``ast``), not from ``sys.modules``, so an import
counts wherever it is written: at the top, inside a function (a "lazy" import only delays the
cycle to the first call), or under ``if TYPE_CHECKING:`` (still a dependency of the design).
An edge goes to the module that the statement makes Python execute:

- ``import a.b.c`` -> ``a.b.c``;
- ``from a.b import c`` -> ``a.b.c`` when ``c`` is a submodule, else ``a.b`` (the package's
  ``__init__``, whose own imports, i.e. its re-exports, are edges of their own);
- relative imports are resolved against the importing module's package;
- ``importlib.import_module("a.b")`` with a literal name -> ``a.b``.

Like grimp/import-linter, no edge is added to the parents of the imported module: Python
initialises them first whoever imports, so they cannot order a cycle.

Cycles are found as strongly connected components (networkx, already installed with torch)
and each one is listed with its elementary cycles and the lines that import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "clipdistill"
MAX_LINES = 650
CYCLES_SHOWN = 100  # elementary cycles listed per knot (their number can grow exponentially);
# the edges listed after them always name every import statement inside the knot


# --- the graph ---------------------------------------------------------------------------------
def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` under ``root`` (a package folder)."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = [root.name, *file.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module, else its longest dotted prefix that is one (``a.b.attr`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(module: str, file: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in ``file``."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):  # every scope: module level, functions, classes, if-blocks
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _nearest_module(alias.name, modules)
                if target is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in modules else _nearest_module(base, modules)
                if target is not None:
                    yield target, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            target = _nearest_module(node.args[0].value, modules)
            if target is not None:
                yield target, node.lineno


def import_graph(root: Path) -> nx.DiGraph:
    """Modules of the package at ``root`` and who imports whom; each edge keeps its ``sites``
    (``file:line`` of every statement that makes it)."""
    modules = module_files(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, file in modules.items():
        for target, line in _imports(module, file, modules):
            if target == module:
                continue
            if not graph.has_edge(module, target):
                graph.add_edge(module, target, sites=[])
            site = f"{file.relative_to(root.parent)}:{line}"
            if site not in graph.edges[module, target]["sites"]:  # `from m import a, b` is one site
                graph.edges[module, target]["sites"].append(site)
    return graph


def knots(graph: nx.DiGraph) -> list[frozenset[str]]:
    """Every group of modules that import each other, directly or around a circle."""
    return sorted(
        (frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1), key=lambda c: sorted(c)
    )


def describe_knot(graph: nx.DiGraph, knot: frozenset[str]) -> str:
    sub = graph.subgraph(knot)
    found = list(islice(nx.simple_cycles(sub), 10 * CYCLES_SHOWN + 1))
    cycles = sorted(found, key=lambda c: (len(c), c))
    lines = [f"import cycle among {len(knot)} modules: {', '.join(sorted(knot))}"]
    for cycle in cycles[:CYCLES_SHOWN]:
        lines.append("  cycle: " + " -> ".join([*cycle, cycle[0]]))
    if len(cycles) > CYCLES_SHOWN:
        more = "over " if len(found) > 10 * CYCLES_SHOWN else ""
        lines.append(f"  ... and {more}{len(cycles) - CYCLES_SHOWN} more cycles")
    for source, target in sorted(sub.edges):
        sites = sorted(sub.edges[source, target]["sites"], key=lambda site: int(site.rpartition(":")[2]))
        lines.append(f"  {source} -> {target}  ({', '.join(sites)})")
    return "\n".join(lines)


def oversized(root: Path) -> dict[str, int]:
    return {
        module: n
        for module, file in module_files(root).items()
        if (n := len(file.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }


# --- the package -------------------------------------------------------------------------------
def test_no_module_over_650_lines() -> None:
    offenders = oversized(SRC)
    assert not offenders, f"modules over {MAX_LINES} lines (split them by job): {offenders}"


def test_no_import_cycles() -> None:
    graph = import_graph(SRC)
    offenders = knots(graph)
    assert not offenders, "\n".join(describe_knot(graph, k) for k in offenders)


# --- the graph code finds what it must ------------------------------------------------------------
def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_graph_finds_a_lazy_import_cycle(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import thing\n",
            "b.py": "def thing():\n    from pkg.a import other  # lazy\n    return other\n",
        },
    )
    graph = import_graph(package)
    assert knots(graph) == [frozenset({"pkg.a", "pkg.b"})]
    assert "pkg/b.py:2" in describe_knot(graph, knots(graph)[0])


def test_graph_resolves_submodules_relative_imports_and_reexports(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "__init__.py": "",
            "base.py": "def load():\n    from pkg import methods  # a submodule, not a name\n",
            "methods/__init__.py": "from . import one\n",
            "methods/one.py": "from ..base import load\n",
            "api/__init__.py": "from pkg.api.core import run  # re-export\n",
            "api/core.py": "import pkg.client\n",
            "client.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.api import run\n",
            "leaf.py": "import pkg.base\nfrom pkg.base import load\n",
        },
    )
    graph = import_graph(package)
    assert knots(graph) == [
        frozenset({"pkg.api", "pkg.api.core", "pkg.client"}),
        frozenset({"pkg.base", "pkg.methods", "pkg.methods.one"}),
    ]
    assert set(graph.successors("pkg.leaf")) == {"pkg.base"}


def test_graph_finds_no_cycle_in_a_layered_package(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.top import main\n",
            "errors.py": "class Error(Exception): ...\n",
            "low.py": "from pkg.errors import Error\n",
            "top.py": "from pkg import low\nfrom pkg.errors import Error\n",
        },
    )
    assert knots(import_graph(package)) == []


def test_size_check_counts_lines(tmp_path: Path) -> None:
    package = _package(tmp_path, {"__init__.py": "", "big.py": "x = 1\n" * (MAX_LINES + 1), "ok.py": "x = 1\n"})
    assert oversized(package) == {"pkg.big": MAX_LINES + 1}


@pytest.mark.parametrize("level", [1, 2])
def test_relative_import_levels(tmp_path: Path, level: int) -> None:
    dots = "." * level
    package = _package(
        tmp_path,
        {"__init__.py": "", "x.py": "", "sub/__init__.py": "", "sub/x.py": "", "sub/y.py": f"from {dots} import x\n"},
    )
    expected = "pkg.sub.x" if level == 1 else "pkg.x"
    assert set(import_graph(package).successors("pkg.sub.y")) == {expected}


SEED_METHODS = ("conaclip", "mcad", "dcd", "comkd")


def test_seed_method_names_are_strings_only_in_their_own_file() -> None:
    """Adding or renaming a method touches its file and one registry line: nothing else in the
    package may spell a seed method's name as a string (the demo, report, benchmarks and
    trainer read it from the registry)."""
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            is_name = isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SEED_METHODS
            if is_name and file != SRC / "distill" / "methods" / f"{node.value}.py":
                offenders.append(f"{file.relative_to(SRC.parent)}:{node.lineno}: {node.value!r}")
    assert not offenders, "seed method names outside their own method file:\n" + "\n".join(offenders)
