"""MkDocs hooks of the documentation site (listed under ``hooks:`` in ``mkdocs.yml``).

``<!-- exports-table -->`` in a page is replaced by a table of everything ``oodunleash`` exports
(``oodunleash.__all__``): each name links to where the API reference documents it, with the
first line of its docstring. The table is built from the installed package at build time, so it
never lags behind ``__init__.py``; a name whose documentation page is missing makes the link
unresolvable, which ``mkdocs build --strict`` reports.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

MARKER = "<!-- exports-table -->"
SPHINX_ROLE = re.compile(r":[a-z]+:`(?P<tilde>~?)(?P<target>[^`]+)`")

#: Modules with a page in the API reference, in the order a name is looked up.
DOCUMENTED = (
    "oodunleash.wrapper",
    "oodunleash.constraint",
    "oodunleash.masking",
    "oodunleash.training",
    "oodunleash.scores",
    "oodunleash.features",
    "oodunleash.metrics",
    "oodunleash.results",
    "oodunleash.evaluation",
    "oodunleash.hub",
    "oodunleash.datasets",
    "oodunleash.distributed",
    "oodunleash.tuning",
    "oodunleash.proxy",
)


def _documented_path(name: str, obj: Any) -> str | None:
    """The identifier under which the API reference renders ``obj``."""
    if inspect.ismodule(obj):
        return obj.__name__ if obj.__name__ in DOCUMENTED else None
    for module_name in DOCUMENTED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is obj:
            return f"{module_name}.{name}"
    return None


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) if not isinstance(obj, str) else None
    if not doc:
        return ""
    first = doc.strip().split("\n\n", 1)[0].replace("\n", " ")
    # Sphinx roles read as code here (the API pages themselves turn them into links).
    return SPHINX_ROLE.sub(
        lambda m: f"`{m['target'].rsplit('.', 1)[-1] if m['tilde'] else m['target']}`", first
    )


def exports_table() -> str:
    package = importlib.import_module("oodunleash")
    rows = ["| Name | What it is |", "|---|---|"]
    for name in sorted(package.__all__, key=lambda n: (n.startswith("_"), n.lower())):
        obj = getattr(package, name)
        if name == "__version__":
            rows.append(f"| `__version__` | The installed version, `{obj}`. |")
            continue
        path = _documented_path(name, obj)
        label = f"[`{name}`][{path}]" if path else f"`{name}`"
        rows.append(f"| {label} | {_summary(obj)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, exports_table())
    return markdown
