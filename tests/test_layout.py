"""The floor plan holds: no import cycle (function-level imports included), each engine behind its one seam, few
modules at the package's top, every third-party module the package imports declared as a runtime dependency, and test
files named uniquely."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "pipeline")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str) -> list[str]:
    """Every module name an import statement anywhere in the file (functions included) names."""
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]  # `from pipeline.x import y` may be a module
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path):
            if imp in mods and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_each_engine_behind_its_seam():
    users: dict[str, list[str]] = {"ray": [], "deepspeed": []}
    for name, path in _modules().items():
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in users and name not in users[top]:
                users[top].append(name)
    assert users["ray"] == ["pipeline.runtime.ray_seam"], users["ray"]
    assert users["deepspeed"] == ["pipeline.runtime.ds_seam"], users["deepspeed"]


def test_few_modules_at_the_top_and_a_package_per_stage():
    top = sorted(f for f in os.listdir(PKG) if f.endswith(".py"))
    assert len(top) <= 10, top
    packages = {d for d in os.listdir(PKG) if os.path.isfile(os.path.join(PKG, d, "__init__.py"))}
    assert {"config", "storage", "runtime", "training", "download", "dvae", "clip", "tokenize", "prior", "sample",
            "report", "demo"} <= packages


def _declared() -> set[str]:
    """Import names provided by the runtime dependencies in pyproject.toml (and what they depend on)."""
    deps = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["dependencies"]
    provides = importlib.metadata.packages_distributions()
    dists = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    return {mod for mod, owners in provides.items()
            if any(o.lower().replace("_", "-") in dists for o in owners)}


# Imported only when a setting asks for them, each behind an error that says how to install it; not runtime
# dependencies because pip cannot install them with ours (their metadata pins what this venv outgrew), or because the
# pipeline never needs them (W&B is the user's choice; in the dev extra for its tests).
OPTIONAL_IMPORTS = {
    "autofaiss": "tokenize.export_index; 2.18 declares numpy<2, so make setup installs it --no-deps",
    "wandb": "logging.wandb.project; optional experiment tracking (ConfigError: pip install wandb)",
}


def test_every_third_party_import_is_a_declared_runtime_dependency():
    declared = _declared() | set(OPTIONAL_IMPORTS)
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for name, path in _modules().items():
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top not in stdlib and top != "pipeline" and top not in declared and top != "__future__":
                missing.setdefault(top, name)
    assert not missing, f"imported but not declared in [project] dependencies: {missing}"


def test_test_files_have_unique_names():
    # tests/ has no __init__.py files, so pytest imports each test module by its basename: two files with one
    # name in different folders stop the whole collection ("import file mismatch") on a clean checkout.
    seen: dict[str, str] = {}
    clashes = []
    for root, _, files in sorted(os.walk(os.path.join(REPO, "tests"))):
        for name in sorted(f for f in files if f.startswith("test_") and f.endswith(".py")):
            rel = os.path.relpath(os.path.join(root, name), REPO)
            if name in seen:
                clashes.append(f"{seen[name]} and {rel}")
            seen.setdefault(name, rel)
    assert not clashes, f"test files share a name: {clashes}"
