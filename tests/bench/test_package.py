"""oodunleash.bench is an application: `import oodunleash` leaves it out; old paths warn."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_oodunleash_leaves_the_benchmark_out():
    code = (
        "import oodunleash, sys; "
        "old = ('oodunleash.benchmark', 'oodunleash.datasets', 'oodunleash.demo', "
        "'oodunleash.models'); "
        "loaded = [m for m in sys.modules if m.startswith('oodunleash.bench') or m in old]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("oodunleash.benchmark", "oodunleash.bench.run", "run_seed"),
        ("oodunleash.datasets", "oodunleash.bench.datasets", "FashionMNIST"),
        ("oodunleash.demo", "oodunleash.bench.demo", "run_demo"),
        ("oodunleash.models", "oodunleash.bench.models", "SmallCNN"),
    ],
)
def test_old_paths_warn_and_reexport(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        "assert any(issubclass(w.category, DeprecationWarning) and 'oodunleash.bench' in "
        "str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        f"assert getattr(old, {name!r}) is getattr(importlib.import_module({new!r}), {name!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
