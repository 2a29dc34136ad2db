"""The import graph points one way: core -> export -> engines -> repository -> serving -> the CLI, and the
client depends on the core alone. Read from the source (every import, lazy ones inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "clients", "perf")
# Layers, lowest first: a module may import its own layer and the ones below it, never one above.
LAYERS = ["core", "common", "export", "engines", "repository", "serving", "cli"]


def _modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "results" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The project's modules `name` imports (an imported name that is a module counts as that module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "builder":
        return parts[0]
    if module in ("builder.errors",) or module.startswith("builder.core"):
        return "core"
    if module == "builder.__main__":  # the CLI's entry point (its parser is builder.cli)
        return "cli"
    if module == "builder.cli.args":  # the argument groups every command line shares, builder.engines.trt's too
        return "common"
    if len(parts) > 2 or (ROOT / "builder" / parts[-1]).is_dir():
        return parts[1] if parts[1] in LAYERS else "common"
    return "common"


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_in_a_cycle():
    assert _cycles(_graph()) == []


def test_packages_import_one_way():
    graph = _graph()
    layers = {}
    for module, targets in graph.items():
        for target in targets:
            layers.setdefault(_layer(module), set()).add(_layer(target))
    assert _cycles({k: v - {k} for k, v in layers.items()}) == []
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if _layer(module) in LAYERS and _layer(target) in LAYERS
              and LAYERS.index(_layer(target)) > LAYERS.index(_layer(module))]
    assert upward == []
    # Nothing in the builder imports the client or the perf tools.
    assert not [m for m, targets in graph.items() if m.startswith("builder")
                for t in targets if not t.startswith("builder")]


def test_the_client_depends_on_the_core_alone():
    graph = _graph()
    outside = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("clients")
                     for t in targets if not t.startswith(("clients", "builder.core", "builder.errors")))
    assert outside == []
    # And the core imports nothing of the project but itself and the one error class.
    assert not [t for m, targets in graph.items() if m.startswith("builder.core")
                for t in targets if not t.startswith(("builder.core", "builder.errors"))]


def test_the_standard_library_is_imported_at_the_top():
    """The project's one way of importing: the standard library and light modules at the top of a module; heavy
    packages (torch, timm, ONNX, TensorRT, tritonclient, ...: `HEAVY_MODULES` in conftest) inside the function that
    needs them, so `--help` and the light commands stay instant (the --help tests check that side)."""
    import sys

    inside = []
    for name, path in _modules().items():
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                inside += [f"{name}:{node.lineno} {root}" for root in roots
                           if root in sys.stdlib_module_names and root != "__future__"]
    assert inside == []
