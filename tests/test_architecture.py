"""The package is laid out as its architecture: read from the imports of every module (``ast``,
type-only imports and imports inside functions included), never from a hand-kept list.

- no import cycle between modules;
- subpackages depend one way, down the pipeline (:data:`LAYERS`);
- the package root stays small;
- no module exists only to re-export names under an old path.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import oodunleash

PACKAGE = pathlib.Path(oodunleash.__file__).parent

#: The pipeline, bottom to top: a module may import from its own layer and the layers below it.
#: The root's config sits above the scores it names; the wrapper above the checkpoints it writes;
#: tuning builds wrappers; the command line and the benchmark (which its ``demo`` runs) are the
#: applications on top, used by nothing in the library.
LAYERS: list[set[str]] = [
    {"runtime", "_version"},
    {"masks"},
    {"finetune"},
    {"features"},
    {"scores"},
    {"evaluation"},
    {"decision"},
    {"config"},
    {"checkpoint"},
    {"wrapper"},
    {"tuning"},
    {"__init__"},
    {"cli", "__main__", "bench"},
]
MAX_ROOT_FILES = 12


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports (``from pkg import submodule`` counts as
    importing the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    # A package's __init__ importing its own submodules is how it exports them, not a
    # dependency of the package on itself; the reverse edge (submodule -> its package) is.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{name} belongs to no layer: add its subpackage to LAYERS")


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_cycle():
    # Guards the test above: a two-module and a three-module cycle are found.
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_pipeline():
    upward = [
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        for dep in deps
        if layer_of(dep) > layer_of(name)
    ]
    assert upward == []


def test_root_holds_few_files():
    files = sorted(p.name for p in PACKAGE.iterdir() if p.is_file())
    assert len(files) <= MAX_ROOT_FILES, files


def test_every_subpackage_says_what_it_owns():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.parent.name}/__init__.py needs a docstring"


def reexport_only(path: pathlib.Path) -> bool:
    """A module whose body is only imports, ``__all__``, a docstring and a deprecation warning
    or ``__getattr__`` forwarding: a shim kept for an old import path."""
    tree = ast.parse(path.read_text())
    mentions_deprecation = "deprecat" in path.read_text().lower()
    body = [
        node
        for node in tree.body
        if not isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        and not (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        )
    ]
    forwarding = all(
        isinstance(node, ast.Expr | ast.FunctionDef)
        and (not isinstance(node, ast.FunctionDef) or node.name == "__getattr__")
        for node in body
    )
    return mentions_deprecation and forwarding


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_deprecated_shim_modules(path):
    assert not reexport_only(path), f"{module_name(path)} only re-exports deprecated names"


def test_shim_detector_recognises_a_shim(tmp_path):
    shim = tmp_path / "old.py"
    shim.write_text(
        '"""Deprecated: moved to pkg.new."""\nimport warnings\nfrom pkg.new import thing\n'
        'warnings.warn("deprecated", DeprecationWarning)\n__all__ = ["thing"]\n'
    )
    assert reexport_only(shim)
    real = tmp_path / "real.py"
    real.write_text('"""A module."""\nfrom pkg.new import thing\n\ndef use():\n    return thing\n')
    assert not reexport_only(real)


def test_the_benchmark_is_used_by_nothing_in_the_library():
    users = sorted(
        name
        for name, deps in import_graph().items()
        if any(d.startswith("oodunleash.bench") for d in deps)
        and not name.startswith(("oodunleash.bench", "oodunleash.cli"))
    )
    assert users == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_CODE_LINES = 80


def function_code_lines(path: pathlib.Path) -> dict[str, int]:
    """Lines of code of every function in ``path``, its docstring left out."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[1] if ast.get_docstring(node) and len(node.body) > 1 else node.body[0]
            out[f"{module_name(path)}:{node.lineno} {node.name}"] = (
                node.end_lineno - first.lineno + 1
            )
    return out


def test_modules_and_functions_stay_readable():
    long_modules = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    long_functions = {
        name: n
        for p in PACKAGE.rglob("*.py")
        for name, n in function_code_lines(p).items()
        if n > MAX_FUNCTION_CODE_LINES
    }
    assert long_modules == {} and long_functions == {}
