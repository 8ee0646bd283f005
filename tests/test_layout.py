"""The layout's promises: one import root, folders by role, and no import cycles (not even
type-only ones) between the project's modules."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ptst"


def project_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name, reached through ptst/'s links."""
    modules: dict[str, Path] = {}
    paths = [
        Path(folder, file)
        for folder, _dirs, files in os.walk(PACKAGE, followlinks=True)
        for file in files
        if file.endswith(".py")
    ]
    for path in sorted(paths):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions and TYPE_CHECKING
    blocks included). `from a.b import c` counts as importing `a.b.c` when that is a module,
    else `a.b`; a package's parent `__init__` that Python runs on the way is not counted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in known] or [base]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_folder_is_under_the_one_import_root() -> None:
    modules = project_modules()
    for package in ("proxy", "commands", "engine", "bench", "tune"):
        assert f"ptst.{package}" in modules, f"ptst/{package} does not link to {package}/"
        assert (PACKAGE / package).resolve() == ROOT / package
    assert (PACKAGE / "templates").resolve() == ROOT / "templates"


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_type_only_cycle(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import B\n")
    b = tmp_path / "b.py"
    b.write_text("def f() -> None:\n    from p.a import A\n")
    known = {"p.a", "p.b"}
    graph = {"p.a": imports_of("p.a", a, known), "p.b": imports_of("p.b", b, known)}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # the request path never reaches for commands, the engine, the bench or fine-tuning
        ("ptst.proxy", ("ptst.commands", "ptst.engine", "ptst.bench", "ptst.tune")),
        # the bench measures the proxy from outside: no commands, no fine-tuning code
        ("ptst.bench", ("ptst.commands", "ptst.tune")),
        ("ptst.engine", ("ptst.commands", "ptst.bench")),
        # fine-tuning is a library the commands drive: no commands, no bench
        ("ptst.tune", ("ptst.commands", "ptst.bench")),
    ],
)
def test_folders_depend_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    graph = import_graph()
    bad = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if target.startswith(forbidden)
    )
    assert not bad, bad
