"""Structure of lightning_rlhf.functional: acyclic imports, a leaf registries module, sizes, docs."""

import ast
import re
from pathlib import Path

import lightning_rlhf.functional as F

PKG = "lightning_rlhf.functional"
ROOT = Path(F.__file__).resolve().parent
REPO = ROOT.parent.parent
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in `path` (module level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                base = PKG if node.level == 1 else PKG.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def _edges(stem: str) -> set[str]:
    """Modules of functional/ that `stem` imports ("__init__" for the package itself)."""
    out = set()
    for name in _imported_modules(MODULES[stem]):
        if name == PKG:
            out.add("__init__")
        elif name.startswith(PKG + ".") and name[len(PKG) + 1 :].split(".")[0] in MODULES:
            out.add(name[len(PKG) + 1 :].split(".")[0])
    return out - {stem}


def test_no_import_cycles_inside_functional():
    graph = {stem: _edges(stem) for stem in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for stem in graph:
        if stem not in state:
            visit(stem, [])
    assert "__init__" not in set().union(*(graph[s] for s in graph if s != "__init__"))


def test_registries_is_a_leaf_module():
    own = {n for n in _imported_modules(MODULES["registries"]) if n.startswith("lightning_rlhf")}
    assert own <= {"lightning_rlhf.registry", "lightning_rlhf.registry.Registry"}
    for stem, registry in (
        ("kl", "KL_ESTIMATORS"), ("losses", "LOSS_AGGREGATIONS"),
        ("advantages", "ADVANTAGE_ESTIMATORS"), ("policy_losses", "POLICY_LOSSES"),
    ):
        assert f"{PKG}.registries.{registry}" in _imported_modules(MODULES[stem]), stem
        assert getattr(F, registry).names(), registry


def test_file_and_function_sizes():
    for stem, path in MODULES.items():
        src = path.read_text()
        assert src.count("\n") < 400, stem
        tree = ast.parse(src)
        assert ast.get_docstring(tree), f"{stem} has no module docstring"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                assert node.end_lineno - start + 1 < 50, f"{stem}.{node.name} is 50+ lines"


def test_no_six_identical_lines_in_two_places():
    seen: dict[tuple[str, ...], str] = {}
    for stem, path in MODULES.items():
        lines = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        for k in range(len(lines) - 5):
            window = tuple(text for _, text in lines[k : k + 6])
            here = f"{stem}:{lines[k][0]}"
            assert window not in seen, f"six lines repeated at {seen.get(window)} and {here}"
            seen[window] = here


def test_docs_reference_only_repository_files_and_every_public_function():
    math_md = (REPO / "docs" / "math.md").read_text()
    # (no file refers outside the repository: tests/test_docs.py checks every file)
    for name in F.__all__:
        assert f"`{name}`" in math_md or name.isupper() and name in math_md, f"docs/math.md lacks {name}"
    for ref in re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml))`", math_md):
        assert (REPO / ref).exists(), f"docs/math.md refers to {ref}, which is not in the repository"
