"""The packages' import graph: no cycles, and every import points down the layers.

The sources are parsed with ``ast``, never imported, so every import counts: module
level, inside functions, under ``if TYPE_CHECKING:``, absolute and relative.

Layers (STYLE.md, point 4): ``orchestrator`` may import anything; ``trainer``,
``inference_server``, ``reward_envs`` and ``slurm`` import only themselves and ``common``;
``common`` imports none of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "trainer", "inference_server", "reward_envs", "slurm", "orchestrator")
ALLOWED = {
    "common": {"common"},
    "trainer": {"trainer", "common"},
    "inference_server": {"inference_server", "common"},
    "reward_envs": {"reward_envs", "common"},
    "slurm": {"slurm", "common"},
    "orchestrator": set(PACKAGES),
}


@dataclass(frozen=True)
class Import:
    """One import statement of ``source`` that reaches the project module ``target``."""

    source: str
    target: str
    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest project module that importing ``name`` runs (None: not ours)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                if not is_package:
                    pkg.pop()
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            # ``from pkg import sub`` reaches the submodule when there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in dict.fromkeys(names):
            target = _resolve(name, modules)
            if target is not None:
                out.append(Import(module, target, path, node.lineno, ast.unparse(node)))
    return out


def _graph() -> dict[str, list[Import]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle per strongly connected component that has one (Tarjan, then a BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and not any(e.target == start for e in graph[start]):
            continue
        # Shortest path start -> ... -> start inside the component.
        prev: dict[str, Import] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for e in graph[v]:
                    if e.target in members and e.target not in prev:
                        prev[e.target] = e
                        nxt.append(e.target)
            frontier = nxt
        path, v = [], start
        while True:
            path.append(prev[v])
            v = prev[v].source
            if v == start:
                break
        cycles.append(path[::-1])
    return cycles


def test_every_package_is_scanned() -> None:
    modules = _modules()
    missing = [p for p in PACKAGES if p not in modules]
    if missing:
        pytest.fail(f"packages without an __init__.py (not scanned): {missing}", pytrace=False)


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    text = "\n\n".join(
        " -> ".join([c[0].source, *(e.target for e in c)])
        + "\n"
        + "\n".join(
            f"  {e}"
            for step in c
            for e in sorted(graph[step.source], key=lambda e: e.line)
            if e.target == step.target
        )
        for c in cycles
    )
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s); break each one:\n\n{text}", pytrace=False)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package: str) -> None:
    bad = [
        e
        for module, edges in _graph().items()
        if module.split(".")[0] == package
        for e in edges
        if e.target.split(".")[0] not in ALLOWED[package]
    ]
    allowed = ", ".join(sorted(ALLOWED[package]))
    listing = "\n".join(f"  {e}" for e in bad)
    if bad:
        pytest.fail(
            f"{package} may import only {allowed}; what it shares with a sibling belongs in "
            f"common/:\n{listing}",
            pytrace=False,
        )
