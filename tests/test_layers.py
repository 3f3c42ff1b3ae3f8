"""The package's layers, read from its source: no import from a lower layer to a higher one, no circle.

Layers, lowest first: ``bigjob.errors``, ``bigjob.engine``, ``bigjob.models``, ``bigjob.job``,
``bigjob.cli``. A module may import its own layer and those below; every ``import`` counts,
the lazy ones inside functions too (a lazy import is still a dependency). The engine also
never imports Hydra or OmegaConf. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bigjob"
LAYERS = ["bigjob.errors", "bigjob.engine", "bigjob.models", "bigjob.job", "bigjob.cli"]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The bigjob modules (and third-party top-level names) ``path`` imports, resolved to modules that exist."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules and target.startswith("bigjob."):
                target = target.rpartition(".")[0]  # a name inside a module: the module
            if target in modules and target != name:
                found.add(target)
            elif not target.startswith("bigjob"):
                found.add(target.split(".")[0])
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules, root) for name, path in paths.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} -> {dst}"
        for src, targets in edges.items()
        for dst in targets
        if dst.startswith("bigjob") and layer(src) >= 0 and layer(dst) > layer(src)
    )


def layer(name: str) -> int:
    return max((i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + ".")), default=-1)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert upward(graph()) == []


def test_the_engine_never_imports_hydra_or_omegaconf() -> None:
    edges = graph()
    assert sorted(f"{src} -> {dst}" for src, t in edges.items() if layer(src) == 1 for dst in t if dst in ("hydra", "omegaconf")) == []


def test_no_import_circles() -> None:
    edges = {src: {d for d in targets if d.startswith("bigjob")} for src, targets in graph().items()}
    # A package's __init__ re-exporting its modules is not a circle of concepts: leave those edges out.
    for src in list(edges):
        edges[src] = {d for d in edges[src] if not (d + ".").startswith(src + ".") or src == d}
        edges[src] = {d for d in edges[src] if not src.startswith(d + ".")}
    assert circles(edges) == []


@pytest.mark.parametrize(
    "edges,expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_circle_finder_finds_hand_made_circles(edges, expected) -> None:
    assert circles(edges) == expected


def test_the_layer_check_sees_a_lazy_upward_import_in_a_hand_made_package(tmp_path: Path) -> None:
    root = tmp_path / "bigjob"
    for folder in (root, root / "engine", root / "job"):
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
    (root / "engine" / "x.py").write_text("from . import y\n\ndef f():\n    from bigjob.job.runner import run_job\n")
    (root / "engine" / "y.py").write_text("import torch\nfrom bigjob.engine.x import f\n")
    (root / "job" / "runner.py").write_text("from bigjob.engine import x\n")
    edges = graph(root)
    assert edges["bigjob.engine.x"] == {"bigjob.engine.y", "bigjob.job.runner"} and "torch" in edges["bigjob.engine.y"]
    assert upward(edges) == ["bigjob.engine.x -> bigjob.job.runner"]
    assert circles({k: {d for d in v if d.startswith("bigjob")} for k, v in edges.items()}) == [
        ["bigjob.engine.x", "bigjob.engine.y", "bigjob.job.runner"]
    ]
