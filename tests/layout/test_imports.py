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
    assert "nvit.validation.compare" in graph["nvit.plots"]
    assert "nvit.models.onnx" in graph["nvit.profiler.backends.common"]  # inside a method


def test_no_two_modules_import_each_other():
    graph = import_graph()
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph[b]})
    assert mutual == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_long_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_module_graph_has_no_cycle_of_any_length():
    assert _cycles(import_graph()) == []


def test_arch_and_presets_stand_below_the_redesign():
    """``nvit.arch`` holds the spec and ``nvit.presets`` every preset family (ReViT's per-block widths too); the
    redesign reads the published rule from the presets and neither imports anything that imports the redesign
    back."""
    graph = import_graph()
    for module in ("nvit.arch", "nvit.presets"):
        assert not [m for m in graph[module] if m.startswith("nvit.redesign")]
    assert "nvit.presets" in graph["nvit.redesign.published"] and "nvit.arch" in graph["nvit.redesign.learned"]
    assert "nvit.presets" not in graph["nvit.arch"]  # the spec knows no names


#: Package → the packages above it, which it must never import (lazily or not): arrows only point down.
ABOVE = {
    "models": {"training", "profiler", "lut", "pruning", "export", "validation", "redesign", "service", "commands",
               "demo"},
    "training": {"profiler", "lut", "pruning", "export", "validation", "redesign", "service", "commands", "demo"},
    "lut": {"profiler", "pruning", "export", "validation", "redesign", "service", "commands", "demo"},
    "redesign": {"profiler", "pruning", "export", "validation", "service", "commands", "demo"},
    "profiler": {"pruning", "export", "validation", "service", "commands", "demo"},
    "pruning": {"export", "validation", "service", "commands", "demo"},
    "export": {"validation", "service", "commands", "demo"},
    "validation": {"service", "commands", "demo"},
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


def test_tests_are_grouped_like_the_package():
    """Every test file sits in a folder named after the room it tests (a package of nvit), or in ``commands``
    (the CLI, the demo, the scripts), ``benchmarks`` (the benchmark scripts' own pieces) or ``layout`` (this)."""
    tests = Path(__file__).parents[1]
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert not sorted(p.name for p in tests.glob("test_*.py"))
    folders = {p.parent.relative_to(tests).as_posix() for p in tests.rglob("test_*.py")}
    assert folders <= rooms | {"models", "commands", "benchmarks", "layout"}, folders - rooms
    assert {"lut", "profiler", "pruning", "training", "service", "redesign", "validation", "export"} <= folders


def test_the_readme_layout_names_every_room():
    """README's "How the code is laid out" names every module and package at nvit's top level, and no other."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    first_column = "\n".join(line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))
    named = {m.rstrip("/") for m in re.findall(r"`([a-z_]+(?:\.py|/))`", first_column)}
    rooms = {p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))}
    assert named == rooms
