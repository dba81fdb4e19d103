"""The import layering holds: retriever <- mining <- eval <- hardneg (the public API and ``python -m hardneg``), the
protocols import no implementation, no module cycles.

Read from the source with ``ast`` (imports inside functions count too: a lazy import that closes a cycle is still
a cycle a reader has to untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"retriever": 0, "mining": 1, "eval": 2, "hardneg": 3}  # a package imports its own layer and those below
FOLDERS = {"hardneg": "eval/hardneg"}  # pyproject.toml's package-dir; the others sit at the top level


def _modules() -> dict[str, set[str]]:
    def files(package: str) -> list[Path]:
        return sorted((REPO / FOLDERS.get(package, package)).glob("*.py"))

    names = {f"{package}.{path.stem}" for package in LAYERS for path in files(package)}
    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in files(package):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
                    imported |= {f"{node.module}.{alias.name}" for alias in node.names} & names
                elif isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
            graph[name] = {module for module in imported if module.split(".")[0] in LAYERS} - {name}
    return graph


def test_packages_import_only_their_own_layer_and_those_below():
    wrong = [(module, target) for module, targets in _modules().items() for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]]
    assert not wrong, wrong


def test_the_protocols_import_no_implementation():
    assert _modules()["retriever.protocol"] <= {"retriever.data"}


def test_no_module_imports_itself_through_others():
    graph = _modules()
    cycles = []

    def visit(start: str, module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            if target == start:
                cycles.append(path + [start])
            elif target not in path and target in graph:
                visit(start, target, path + [target])

    for module in graph:
        visit(module, module, [module])
    assert not cycles, cycles[:3]
