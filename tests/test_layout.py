"""The house's import rules (docs/ARCHITECTURE.md): imports run one way, cluster/ -> the Ray
actors (workers/*.py) -> the engine (workers/engine/) and what the tier actors run
(workers/memory/) -> the model (workers/model/) -> kernels/, and no two modules import each other, directly or around a cycle. Every import
counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "workers", "kernels", "proto")
# a module may import modules of its own layer and of the layers ranked below it
LAYERS = {"cluster": 4, "actors": 3, "engine": 2, "memory": 2, "model": 1, "kernels": 0, "proto": 0}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "workers":
        return parts[1] if len(parts) > 2 and parts[1] in ("engine", "memory", "model") else "actors"
    return parts[0]


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found |= {n for n in names if n in paths}
        graph[module] = found - {module}
    return graph


def test_imports_run_one_way():
    wrong = [f"{m} imports {d}" for m, deps in project_imports().items() for d in deps
             if LAYERS[layer(d)] > LAYERS[layer(m)]]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = project_imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
