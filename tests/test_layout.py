"""The package's floors: no import circle between modules or subpackages, and a bottom floor
(the screening vocabulary and answer grammar, file writing) that imports nothing of ours.

The graph is read from the source (every `import`, at module level and inside functions alike),
so a circle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hcm"
BOTTOM_FLOOR = ("hcm.screening", "hcm.files")


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from hcm import stages` imports the module hcm.stages
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def floor_of(module: str) -> str:
    """A subpackage (hcm.data) is one floor; a top-level module (hcm.rewards) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if (PACKAGE / parts[1]).is_dir() else module


def floor_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    floors: dict[str, set[str]] = {}
    for source, targets in graph.items():
        if source == "hcm":
            continue
        for target in targets:
            if target != "hcm" and floor_of(target) != floor_of(source):
                floors.setdefault(floor_of(source), set()).add(floor_of(target))
    return floors


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_every_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import hcm.a\n"
        "import numpy\n\n"
        "def f():\n"
        "    from hcm import b\n"  # a function-level import counts as much as a top one
        "    from .c import x\n"
    )
    modules = dict.fromkeys(("hcm.a", "hcm.b", "hcm.c", "hcm.m"), source)
    assert imported("hcm.m", source, modules) == {"hcm.a", "hcm.b", "hcm.c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floor_graph({"hcm.data.x": {"hcm.model.y", "hcm.data.z"}}) == {"hcm.data": {"hcm.model"}}


def test_no_import_circle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_between_floors():
    """hcm.data may use hcm.model (to build inputs) or the reverse, never both."""
    cycle = find_cycle(floor_graph(import_graph()))
    assert cycle is None, "import circle between floors: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", BOTTOM_FLOOR)
def test_the_bottom_floor_imports_nothing_of_ours(module):
    assert import_graph()[module] == set()
