"""The package's imports run one way: no cycles and no import from a lower layer to a higher one.

Every module of ``mimo_ray`` is parsed with :mod:`ast` (imports inside functions count too) and the
module graph is built from the imports that name ``mimo_ray`` modules.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "mimo_ray"

# Lowest first. A module may import only from its own layer or a lower one.
# Leaf utility packages sit where their imports fit.
LAYERS: list[tuple[str, ...]] = [
    ("mimo_ray", "mimo_ray.observability"),
    ("mimo_ray.config",),
    ("mimo_ray.config_cli",),
    ("mimo_ray.media",),
    ("mimo_ray.parallel",),
    ("mimo_ray.model",),
    ("mimo_ray.data",),
    ("mimo_ray.stages",),
    ("mimo_ray.runtime",),
    ("mimo_ray.driver",),
    ("mimo_ray.convert",),
    ("mimo_ray.perf",),
    ("mimo_ray.cli",),
    ("mimo_ray.api",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies inside."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
            # ``from pkg import sub`` names the submodule; ``from mod import fn`` names mod.
            targets = [t for t in targets[:-1] if t in modules] or [prefix]
        for target in targets:
            if not target.startswith("mimo_ray"):
                continue
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (parsed once per session; callers do not mutate it)."""
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if _layer(m) < 0]
    assert unplaced == [], f"modules outside every layer of LAYERS: {unplaced}"


def test_no_module_cycles():
    cycles = _cycles(_graph())
    assert cycles == [], f"module import cycles: {cycles}"


def test_no_package_cycles():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == "mimo_ray":
            continue
        src = _package(module)
        packages.setdefault(src, set())
        for target in targets:
            if target != "mimo_ray" and _package(target) != src:
                packages[src].add(_package(target))
    cycles = _cycles(packages)
    assert cycles == [], f"package import cycles: {cycles}"


def test_no_upward_imports():
    upward = sorted(
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_walker_sees_function_level_imports_and_cycles():
    graph = _graph()
    # ``build_data_source`` imports the manifest pipeline inside the function body.
    assert "mimo_ray.data.pipeline" in graph["mimo_ray.driver.data_sources"]
    # ``from mimo_ray.parallel import imported_layout as layout`` names the submodule, not the package.
    assert "mimo_ray.parallel.imported_layout" in graph["mimo_ray.convert.importer"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("mimo_ray.stages.base") < _layer("mimo_ray.runtime.actor_group")


def test_stages_know_tensors_not_ray():
    """``stages/`` imports no Ray and holds none of Ray's calling conventions (``runtime/stage_actor.py`` does)."""
    found = []
    for path in sorted((PACKAGE_ROOT / "stages").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] == "ray"]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ray":
                found.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.FunctionDef) and node.name in ("call", "run_stashed", "take"):
                found.append(f"{path.name}: def {node.name}")
            elif isinstance(node, ast.keyword) and node.arg in ("num_returns", "tensor_transport"):
                found.append(f"{path.name}: {node.arg}=")
    assert found == [], f"Ray in stages/: {found}"
