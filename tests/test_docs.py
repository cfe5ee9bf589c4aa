"""The documentation: strict build, API coverage, docstrings, and the pages' declared needs.

The code of the pages themselves runs with ``pytest --markdown-docs docs/`` (see
``docs/conftest.py``) and the docstring examples with ``pytest --doctest-modules oodunleash``;
this file checks what those runs cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import oodunleash
from tests.helpers.scripts import ROOT, load_script

DOCS = ROOT / "docs"

#: Modules without a page in the API reference, and why.
NOT_IN_API_REFERENCE = {
    "oodunleash._version": "the version string, exported as oodunleash.__version__",
    "oodunleash.cli": "the command line, documented by `oodunleash --help`",
}

#: Public methods and properties still without a docstring (their own or inherited). Owners:
#: delete an entry when you add its docstring; a new gap fails the test.
KNOWN_GAPS: set[str] = set()


def _modules() -> list[str]:
    names = ["oodunleash"]
    names += [m.name for m in pkgutil.walk_packages(oodunleash.__path__, "oodunleash.")]
    return sorted(names)


def _public_objects():
    """``(qualified name, object)`` of every class and function some ``__all__`` exports."""
    seen = set()
    for module_name in _modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{obj.__module__}.{obj.__qualname__}", obj


def _public_members(cls: type):
    """``(name, function)`` of the public methods and properties ``cls`` itself defines."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            value = value.fget
        elif isinstance(value, classmethod | staticmethod):
            value = value.__func__
        if inspect.isfunction(value) and value.__qualname__.startswith(cls.__qualname__ + "."):
            yield name, value


def test_every_module_declares_all() -> None:
    missing = [m for m in _modules() if not hasattr(importlib.import_module(m), "__all__")]
    assert not missing, f"modules without __all__: {missing}"


def test_public_classes_and_functions_have_docstrings() -> None:
    missing = [name for name, obj in _public_objects() if not (obj.__doc__ or "").strip()]
    assert not missing, "public objects without a docstring:\n" + "\n".join(missing)


def test_public_methods_have_docstrings() -> None:
    missing = set()
    for qualname, obj in _public_objects():
        if not inspect.isclass(obj):
            continue
        for name, member in _public_members(obj):
            # A method overriding a documented one inherits its documentation.
            doc = inspect.getdoc(getattr(obj, name)) if name in dir(obj) else member.__doc__
            if not (doc or "").strip() and not (member.__doc__ or "").strip():
                missing.add(f"{qualname}.{name}")
    new = sorted(missing - KNOWN_GAPS)
    assert not new, "public methods without a docstring:\n" + "\n".join(new)


def test_every_public_module_has_an_api_page() -> None:
    pages = "\n".join(p.read_text("utf8") for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: (\S+)", pages, flags=re.MULTILINE))
    missing = []
    for module_name in _modules():
        parts = module_name.split(".")
        if module_name in NOT_IN_API_REFERENCE or any(p.startswith("_") for p in parts):
            continue
        # Submodules of a documented package are rendered through the package's __all__.
        if not any(module_name == d or module_name.startswith(d + ".") for d in documented):
            missing.append(module_name)
    assert not missing, f"modules with no page under docs/api/: {missing}"


def test_every_export_links_to_its_documentation() -> None:
    hooks = load_script("scripts/mkdocs_hooks.py")
    unlinked = [
        name
        for name in oodunleash.__all__
        if name != "__version__" and hooks._documented_path(name, getattr(oodunleash, name)) is None
    ]
    assert not unlinked, (
        f"oodunleash exports {unlinked}, which no module of the API reference documents "
        f"(scripts/mkdocs_hooks.py DOCUMENTED)"
    )


def test_pages_declare_only_oodunleash_names_that_exist() -> None:
    """Pages skipped while a module is missing must run for real once it exists: every
    ``docs-test: requires`` name of the project must resolve now."""
    docs_conftest = load_script("docs/conftest.py", "docs_conftest")
    unresolved = []
    for page in sorted(DOCS.rglob("*.md")):
        for name in docs_conftest.page_requirements(page):
            if name.startswith("oodunleash") and docs_conftest._missing(name) is not None:
                unresolved.append(f"{page.relative_to(ROOT)}: {name}")
    assert not unresolved, "pages waiting for names that do not exist:\n" + "\n".join(unresolved)


def test_concepts_figure_script_runs(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "concepts.svg"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_concepts_figure.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()
    assert (DOCS / "assets/concepts.svg").is_file()


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: pathlib.Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("MkDocs not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site/search/search_index.json").is_file()
