"""The package's shape: no import cycles, imports only downwards through the layers, no warning filters
set at import time, and files and functions small enough to read.

Every module of `lightning_rlhf` is parsed with `ast` (nothing is imported). ALL its imports count,
including those inside functions; only imports under `if TYPE_CHECKING:` are ignored. An imported name
maps to the module it lands in: `from lightning_rlhf.x import y` imports `lightning_rlhf.x.y` when `y`
is a submodule, else `lightning_rlhf.x` (its `__init__`); relative imports are resolved first, and
`importlib.import_module("lightning_rlhf....")` with a literal name counts too. A package `__init__`
importing its own submodules makes edges like any other module.

Layers, low to high (a module may import its own layer or lower):
    0 registry, errors   1 functional   2 models, data   3 rollout, rewards   4 algorithms, callbacks
    5 cli, commands, command_registry, pipeline, plot, sweep, lightning_cli, loggers, __main__, and `lightning_rlhf` itself

Simplification: imports are read, not executed, so an import built from a non-literal string is not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lightning_rlhf"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50
LAYERS = {
    "registry": 0, "errors": 0,
    "functional": 1,
    "models": 2, "data": 2,
    "rollout": 3, "rewards": 3,
    "algorithms": 4, "callbacks": 4,
    "cli": 5, "commands": 5, "command_registry": 5, "export": 5, "pipeline": 5, "plot": 5, "sweep": 5, "lightning_cli": 5, "loggers": 5, "__main__": 5,
}  # fmt: skip
TOP_LAYER = 5  # the package's own __init__
WARNING_FILTERS = {"filterwarnings", "simplefilter"}


# ----------------------------------------------------------------------------------------------------
# reading the package


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST):
    """Every Import / ImportFrom / importlib.import_module call below `node`, skipping TYPE_CHECKING blocks."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
              and child.func.attr == "import_module" and child.args
              and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
            yield child
        yield from _walk_imports(child)


def _known(name: str) -> str | None:
    """`name` if it is a package module, else its longest prefix that is one (None outside the package)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules one import statement lands in."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.Call):
        names = [node.args[0].value]
    else:
        source = _resolve_from(module, node)
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    return [t for t in (_known(n) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")) if t]


def _edges() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}; self-imports dropped."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for module, tree in TREES.items():
        for node in _walk_imports(tree):
            for target in _targets(module, node):
                if target != module:
                    graph[module].setdefault(target, node.lineno)
    return graph


GRAPH = _edges()


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def _layer(module: str) -> int | None:
    if module == PACKAGE:
        return TOP_LAYER
    return LAYERS.get(module.split(".")[1])


# ----------------------------------------------------------------------------------------------------
# the resolver itself


def test_resolver_maps_names_to_modules():
    assert "lightning_rlhf.rewards" in MODULES and "lightning_rlhf.__main__" in MODULES
    assert _targets("lightning_rlhf.cli", ast.parse("from lightning_rlhf import errors").body[0]) == [
        "lightning_rlhf.errors"]
    assert _targets("lightning_rlhf.data.tasks", ast.parse("from . import registry, splits").body[0]) == [
        "lightning_rlhf.data.registry", "lightning_rlhf.data.splits"]
    assert _targets("lightning_rlhf.rewards", ast.parse("from .registry import REWARDS").body[0]) == [
        "lightning_rlhf.rewards.registry"]
    assert _targets("lightning_rlhf.rewards.rules", ast.parse("from .. import errors").body[0]) == [
        "lightning_rlhf.errors"]
    assert _targets("lightning_rlhf.cli", ast.parse("from lightning_rlhf.rewards import REWARDS").body[0]) == [
        "lightning_rlhf.rewards"]
    assert _targets("lightning_rlhf.cli", ast.parse("import torch, lightning_rlhf.models.chat").body[0]) == [
        "lightning_rlhf.models.chat"]
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lightning_rlhf.cli\n"
            "def f():\n    import lightning_rlhf.errors")
    found = [t for n in _walk_imports(ast.parse(code)) for t in _targets("lightning_rlhf.models", n)]
    assert found == ["lightning_rlhf.errors"]


# ----------------------------------------------------------------------------------------------------
# imports


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer(m) is None)
    assert not missing, f"modules with no layer (add them to LAYERS in {Path(__file__).name}): {missing}"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle path per back edge found by a depth-first search (each cycle reported once)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    found: dict[frozenset, list[str]] = {}

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                found.setdefault(frozenset(zip(cycle, cycle[1:])), cycle)
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return list(found.values())


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    lines = [" -> ".join(f"{a} ({_where(a, GRAPH[a][b])})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"
             for c in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def test_imports_point_down_the_layers():
    bad = []
    for a, targets in GRAPH.items():
        for b, line in targets.items():
            la, lb = _layer(a), _layer(b)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{_where(a, line)}: {a} (layer {la}) imports {b} (layer {lb})")
    assert not bad, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(bad))


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


# ----------------------------------------------------------------------------------------------------
# import-time side effects and sizes


def _import_time_nodes(node: ast.AST):
    """Nodes executed when the module is imported: everything but function bodies (class bodies run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Lambda):
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):  # decorators and defaults do run
            for expr in [*child.decorator_list, *child.args.defaults, *child.args.kw_defaults]:
                if expr is not None:
                    yield expr
                    yield from _import_time_nodes(expr)
            continue
        yield child
        yield from _import_time_nodes(child)


def _warning_filter_calls(tree: ast.Module) -> list[int]:
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "warnings"
               for a in n.names if a.name in WARNING_FILTERS}
    lines = []
    for node in _import_time_nodes(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr in WARNING_FILTERS and isinstance(f.value, ast.Name)
                and f.value.id == "warnings") or (isinstance(f, ast.Name) and f.id in aliases):
            lines.append(node.lineno)
    return lines


def test_no_warning_filters_at_import_time():
    bad = [_where(m, line) for m, tree in TREES.items() for line in _warning_filter_calls(tree)]
    assert not bad, ("warnings.filterwarnings / simplefilter called at import time (it changes warnings for "
                     "every user of the package; filter where the warning is raised instead): " + ", ".join(bad))


def test_warning_filter_finder():
    tree = ast.parse("import warnings\nfrom warnings import simplefilter as sf\nwarnings.filterwarnings('ignore')\n"
                     "def f():\n    warnings.simplefilter('ignore')\nclass C:\n    sf('ignore')\n")
    assert _warning_filter_calls(tree) == [3, 7]


def test_file_and_function_sizes():
    offenders = []
    for module, path in MODULES.items():
        rel = path.relative_to(ROOT.parent)
        n_lines = len(path.read_text(encoding="utf-8").splitlines())
        if n_lines > MAX_FILE_LINES:
            offenders.append(f"{rel}: {n_lines} lines (max {MAX_FILE_LINES})")
        for node in ast.walk(TREES[module]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{rel}:{node.lineno}: function {node.name} has {length} lines "
                                     f"(max {MAX_FUNCTION_LINES})")
    assert not offenders, f"{len(offenders)} too long:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_opens_with_a_docstring(module):
    assert ast.get_docstring(TREES[module]), f"{MODULES[module]} has no module docstring"
