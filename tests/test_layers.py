"""The top-level packages import each other in one direction only: no cycle, even through a lazy import.

The layers, lowest first (each may import only those to its left):

    serving  <-  loadtests  <-  models  <-  gateway

* ``serving`` is the shared lower layer: the model server, the model repository's layout, the V2 protocol, the
  process helper, output agreement. It imports no other package of ours.
* ``loadtests`` holds the load drivers (wrk, the open- and closed-loop generators, the hostile clients) and the
  benchmarks; it drives the product through its command line and imports only ``serving``.
* ``models`` builds the bundled models and runs the validation gate, which measures load with ``loadtests``'
  closed-loop driver and speaks raw HTTP with its hostile clients.
* ``gateway`` is the gateway and the ``bluegreen`` command line, which dispatches to everything below.

Every import counts, a function-level (lazy) one included: a lazy import hides a cycle from the interpreter at
start-up, not from the next engineer who has to understand what depends on what.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "loadtests", "models", "gateway")
OURS = (*PACKAGES, "tests")  # the tests import everything; nothing may import them

#: package -> the packages it may import. Its own package is always allowed.
ALLOWED: dict[str, set[str]] = {
    "serving": set(),
    "loadtests": {"serving"},
    "models": {"serving", "loadtests"},
    "gateway": {"serving", "loadtests", "models"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages of ours that the module at ``path`` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside their own package
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in OURS)
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the modules (paths) that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in imported_packages(path) - {package}:
                graph[package].setdefault(imported, []).append(str(path.relative_to(ROOT)))
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``edges`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_imports_between_packages_follow_the_layers() -> None:
    graph = package_graph()
    wrong = {f"{package} -> {imported}": modules for package, deps in graph.items()
             for imported, modules in deps.items() if imported not in ALLOWED[package]}
    assert not wrong, f"imports against the layers (see this module's docstring): {wrong}"


def test_the_package_graph_has_no_cycle() -> None:
    edges = {package: set(deps) for package, deps in package_graph().items()}
    assert find_cycle(edges) is None, f"import cycle between packages: {' -> '.join(find_cycle(edges) or [])}"


def test_the_allowed_edges_themselves_have_no_cycle() -> None:
    assert find_cycle(ALLOWED) is None


def test_the_checker_sees_lazy_imports_and_finds_cycles(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from gateway.cli import main\n    import serving.process as p\n"
                      "    from . import sibling\n")
    assert imported_packages(module) == {"gateway", "serving"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
