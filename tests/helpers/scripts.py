"""The repository's scripts (``scripts/``, ``examples/``) imported by path: they are not a
package, and the tests of the site, the examples and the benchmark summaries call into them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

#: The repository's root: the tests' ``..``.
ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """The script at ``ROOT / relative_path``, imported as a module named ``name`` (by default
    after its file)."""
    path = ROOT / relative_path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
