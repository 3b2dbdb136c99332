"""Every third-party module that ``mimo_ray/`` and ``jobs/`` import is declared in ``pyproject.toml``.

Each file is parsed with :mod:`ast`; ``import x`` and ``from x import y`` count wherever they stand (module level,
inside functions), and so do the names given to ``importlib.import_module`` / ``importlib.util.find_spec`` as string
literals. A module from a distribution that not every install has (an optional extra, a platform marker such as
decord's ``platform_machine == 'x86_64'``, or transformer-engine, which is installed by hand on GPU machines) may be
imported only under a guard: inside a ``try`` that catches ``ImportError``, or probed with ``find_spec``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("mimo_ray", "jobs")
FIRST_PARTY = {"mimo_ray", "jobs", "datasets"}

#: Top-level module → the distributions that provide it, where the names differ.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "yaml": ("pyyaml",),
    "PIL": ("pillow",),
    "megatron": ("megatron-core",),
    "cupy": ("cupy-cuda12x", "cupy-cuda13x"),
    "transformer_engine": ("transformer-engine",),
}

#: Distributions declared nowhere that may still be imported under a guard (installed by hand where they exist).
UNDECLARED_OPTIONAL = {"transformer-engine": "GPU machines only, with a matching CUDA toolkit (README: Installing)"}

_GUARD_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class Use:
    """One import of a top-level module."""

    module: str
    path: str
    line: int
    guarded: bool


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """``(always, sometimes)``: distributions every install gets, and those of extras or platform markers."""
    project = tomllib.loads(pyproject.read_text())["project"]

    def name(requirement: str) -> str:
        return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))

    always = {name(r) for r in project["dependencies"] if ";" not in r}
    sometimes = {name(r) for r in project["dependencies"] if ";" in r}
    for extra in project.get("optional-dependencies", {}).values():
        sometimes |= {name(r) for r in extra}
    return always, sometimes - always


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(ast.unparse(t).split(".")[-1] in _GUARD_ERRORS for t in types if isinstance(t, ast.Name | ast.Attribute))


def imports_in(source: str, path: str) -> list[Use]:
    """Top-level third-party candidates imported by one file (relative imports are first-party)."""
    tree = ast.parse(source, filename=path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node: ast.AST) -> bool:
        while node in parents:
            parent = parents[node]
            if isinstance(parent, ast.Try) and node in parent.body and any(map(_catches_import_error, parent.handlers)):
                return True
            node = parent
        return False

    uses = []
    for node in ast.walk(tree):
        names: list[str] = []
        probe = False
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = ast.unparse(node.func)
            if called.endswith(("import_module", "find_spec")) and isinstance(node.args[0].value, str):
                names, probe = [node.args[0].value], called.endswith("find_spec")
        for name in names:
            top = name.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                uses.append(Use(top, path, node.lineno, probe or guarded(node)))
    return uses


def problems(uses: list[Use], always: set[str], sometimes: set[str]) -> list[str]:
    """What is wrong with each use: undeclared, or optional and unguarded."""
    found = []
    for use in uses:
        dists = {canonical(d) for d in DISTRIBUTIONS.get(use.module, (use.module,))}
        where = f"{use.path}:{use.line} imports {use.module}"
        if dists & always:
            continue
        if dists & (sometimes | set(UNDECLARED_OPTIONAL)):
            if not use.guarded:
                found.append(f"{where} ({'/'.join(sorted(dists))} is not installed everywhere) without a guard")
            continue
        found.append(f"{where}, but no distribution of it ({'/'.join(sorted(dists))}) is declared in pyproject.toml")
    return found


def repo_uses() -> list[Use]:
    uses = []
    for folder in SCANNED:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            uses += imports_in(path.read_text(), str(path.relative_to(REPO_ROOT)))
    return uses


# ---------------------------------------------------------------- the repository


def test_every_imported_third_party_module_is_declared() -> None:
    always, sometimes = declared(REPO_ROOT / "pyproject.toml")
    uses = repo_uses()
    # The scan sees what the package really imports (a broken scan would pass vacuously).
    assert {"torch", "ray", "megatron", "yaml", "PIL", "av", "jinja2", "soxr", "ijson", "decord"} <= {
        u.module for u in uses
    }
    assert problems(uses, always, sometimes) == []


def test_decord_is_x86_64_only_and_imported_only_under_a_guard() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (decord,) = [r for r in project["dependencies"] if canonical(r.split(";")[0]).startswith("decord")]
    assert re.fullmatch(r"decord==0\.6\.0; platform_machine == ['\"]x86_64['\"]", decord)
    decord_uses = [u for u in repo_uses() if u.module == "decord"]
    assert decord_uses and all(u.guarded for u in decord_uses)


# ---------------------------------------------------------------- the checker itself


@pytest.fixture
def declared_sets() -> tuple[set[str], set[str]]:
    return {"numpy", "pyyaml"}, {"cupy-cuda12x", "decord"}


def test_an_undeclared_import_is_named_with_its_file_and_line(declared_sets) -> None:
    source = "import os\nimport numpy as np\n\ndef f():\n    from jinja2.sandbox import X\n    import yaml\n"
    assert problems(imports_in(source, "pkg/a.py"), *declared_sets) == [
        "pkg/a.py:5 imports jinja2, but no distribution of it (jinja2) is declared in pyproject.toml"
    ]


def test_optional_modules_need_a_guard(declared_sets) -> None:
    source = (
        "import importlib.util\n"
        "import decord\n"  # unguarded: reported
        "try:\n    import cupy\nexcept ImportError:\n    cupy = None\n"
        "try:\n    import decord\nexcept (RuntimeError, OSError):\n    pass\n"  # catches no ImportError: reported
        "HAVE_TE = importlib.util.find_spec('transformer_engine') is not None\n"
        "def g():\n    import transformer_engine\n"  # unguarded: reported
    )
    assert problems(imports_in(source, "b.py"), *declared_sets) == [
        "b.py:2 imports decord (decord is not installed everywhere) without a guard",
        "b.py:8 imports decord (decord is not installed everywhere) without a guard",
        "b.py:13 imports transformer_engine (transformer-engine is not installed everywhere) without a guard",
    ]


def test_relative_stdlib_and_first_party_imports_are_not_dependencies() -> None:
    source = "from . import x\nfrom .y import z\nimport json, tomllib\nfrom mimo_ray.config import C\nimport jobs.a\n"
    assert imports_in(source, "c.py") == []


def test_declared_splits_plain_requirements_from_extras_and_markers(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "p"\ndependencies = ["Ray[data]==2.60.0", "decord==0.6.0; platform_machine == \'x86_64\'",'
        ' "PyYAML>=6"]\n[project.optional-dependencies]\ngpu = ["cupy-cuda12x>=13"]\n'
    )
    assert declared(tmp_path / "pyproject.toml") == ({"ray", "pyyaml"}, {"decord", "cupy-cuda12x"})


def test_decode_workers_do_not_load_torch() -> None:
    """Ray Data decode tasks and the isolated decoder process start often; loading torch (and with it ~3 s of CPU on
    a 2-core box) in them is waste: they decode to numpy / uint8 only."""
    import subprocess
    import sys

    code = ("import sys, mimo_ray.data.prepare, mimo_ray.data.isolation, mimo_ray.data.sample_media; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
