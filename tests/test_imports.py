"""The package's import graph has no cycles between two modules (lazy imports inside functions included):
a type lives with what defines it, and what builds on a module imports it, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import nvit

PACKAGE = Path(nvit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the nvit modules it imports anywhere in its source (TYPE_CHECKING and function scope too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def test_import_graph_sees_lazy_imports():
    graph = import_graph()
    assert "nvit.profiler.harness" in graph["nvit.profiler.base"]  # module level
    assert "nvit.export.compare" in graph["nvit.plots"]
    assert "nvit.models.onnx" in graph["nvit.profiler.backends.common"]  # inside a method


def test_no_two_modules_import_each_other():
    graph = import_graph()
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph[b]})
    assert mutual == []


#: Package → the packages above it, which it must never import (lazily or not): arrows only point down.
ABOVE = {
    "models": {"training", "profiler", "lut", "pruning", "export", "service", "commands", "demo"},
    "training": {"profiler", "lut", "pruning", "export", "service", "commands", "demo"},
    "lut": {"profiler", "pruning", "export", "service", "commands", "demo"},
    "profiler": {"pruning", "export", "service", "commands", "demo"},
    "pruning": {"export", "service", "commands", "demo"},
    "export": {"service", "commands", "demo"},
}


def test_no_arrow_runs_back_up():
    graph = import_graph()
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if len(a.split(".")) > 1 and len(b.split(".")) > 1
                    and b.split(".")[1] in ABOVE.get(a.split(".")[1], set()))
    assert upward == []


def test_training_a_plain_model_needs_nothing_from_pruning():
    graph = import_graph()
    for module in ("nvit.commands.train", "nvit.training.fit", "nvit.training.distill"):
        assert not [m for m in graph[module] if m.startswith("nvit.pruning")], module
