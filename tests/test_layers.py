"""The import graph keeps its layers: the SMTP edge never imports the relay's orchestration.

Every import counts, those under TYPE_CHECKING and inside functions too:
a type-only cycle still ties two modules together for every reader and
every refactoring (issue 12: smtp/server.py and relay.py imported each
other, as did relay.py and notify.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in (SRC / "bccguard").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[mod].update(n for n in names if n in modules and n != mod)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_the_smtp_edge_does_not_import_the_orchestration() -> None:
    graph = import_graph()
    for edge in ("bccguard.smtp.server", "bccguard.smtp.edge", "bccguard.smtp.peers"):
        for orchestration in ("bccguard.relay", "bccguard.notify", "bccguard.app", "bccguard.retry"):
            assert not reaches(graph, edge, orchestration), f"{edge} imports {orchestration}"


def test_no_import_cycles_outside_package_inits() -> None:
    """A package's __init__ may lazily import its own submodules (upstream/); nothing else cycles."""
    graph = import_graph()
    for mod, deps in graph.items():
        for dep in deps:
            if dep.startswith(mod + ".") or mod.startswith(dep + "."):
                continue  # a package and its own submodule
            assert not reaches({**graph, mod: set()}, dep, mod) or _only_via_inits(graph, dep, mod), (
                f"import cycle: {mod} -> {dep} -> ... -> {mod}"
            )


def _only_via_inits(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """True if every path back to `goal` passes a package/submodule pair (tolerated)."""
    trimmed = {
        m: {d for d in ds if not (d.startswith(m + ".") or m.startswith(d + "."))} for m, ds in graph.items()
    }
    return not reaches(trimmed, start, goal)
