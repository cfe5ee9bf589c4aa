"""MkDocs hooks of the documentation site (listed under ``hooks:`` in ``mkdocs.yml``).

``<!-- exports-table -->`` in a page is replaced by a table of everything ``oodunleash`` exports
(``oodunleash.__all__``): each name links to where the API reference documents it, with the
first line of its docstring. The table is built from the installed package at build time, so it
never lags behind ``__init__.py``; a name whose documentation page is missing makes the link
unresolvable, which ``mkdocs build --strict`` reports.

Between ``<!-- benchmark-table -->`` and ``<!-- /benchmark-table -->`` goes the benchmark's
results table, built from ``docs/data/benchmark_summary.json`` (the one place its headline
numbers are written): one row per model and method, the change in mean FPR95 computed from the
before and after values, a link to the experiment-log section that measured it, and each row's
command below the table. The site renders it at build time from the JSON, whatever the page
holds; ``python scripts/mkdocs_hooks.py`` also writes it into the page, so that it reads on
GitHub, and ``tests/test_benchmark_table.py`` fails while the page, or a number the README
quotes, disagrees with the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pathlib
import posixpath
import re
import sys
from typing import Any

MARKER = "<!-- exports-table -->"
BENCHMARK_MARKER = "<!-- benchmark-table -->"
BENCHMARK_END = "<!-- /benchmark-table -->"
DOCS_DIR = pathlib.Path(__file__).resolve().parent.parent / "docs"
BENCHMARK_SUMMARY = DOCS_DIR / "data" / "benchmark_summary.json"
BENCHMARK_COLUMNS = (
    "Model (training images)",
    "Method",
    "Seeds",
    "Mean FPR95",
    "Change",
    "ID accuracy (points)",
    "Beats its control?",
    "Measured in",
)
SPHINX_ROLE = re.compile(r":[a-z]+:`(?P<tilde>~?)(?P<target>[^`]+)`")


def _api_modules(root: pathlib.Path = DOCS_DIR.parent) -> tuple[str, ...]:
    """The modules the API reference renders (``::: module`` in ``docs/api/*.md``), in the
    order of the site's navigation, the package page itself left out. Read from the pages, so
    a module that moves only needs its page moved."""
    nav = re.findall(r"api/([\w-]+)\.md", (root / "mkdocs.yml").read_text("utf8"))
    pages = sorted((root / "docs" / "api").glob("*.md"))
    pages.sort(key=lambda page: nav.index(page.stem) if page.stem in nav else len(nav))
    found = [
        name
        for page in pages
        for name in re.findall(r"^::: (\S+)", page.read_text("utf8"), flags=re.MULTILINE)
    ]
    return tuple(dict.fromkeys(name for name in found if name != "oodunleash"))


#: Modules with a page in the API reference, in the order a name is looked up.
DOCUMENTED = _api_modules()


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


def _signed(value: float, digits: int) -> str:
    """``value`` with its sign, a typographic minus, ``digits`` decimals; zero unsigned."""
    text = f"{abs(value):.{digits}f}"
    if float(text) == 0:
        return text
    return ("−" if value < 0 else "+") + text


def fpr95_change(row: dict[str, Any]) -> str:
    """The relative change of the mean FPR95, in whole percent: ``"−41%"``."""
    before, after = row["fpr95_before"], row["fpr95_after"]
    return _signed(round(100 * (after - before) / before), 0) + "%"


def accuracy_change(row: dict[str, Any]) -> str:
    """The change of ID accuracy in points, or the row's note where no single value exists."""
    if row["accuracy_change"] is None:
        return row["accuracy_detail"]
    return _signed(row["accuracy_change"], 2)


def load_benchmark_summary(path: pathlib.Path = BENCHMARK_SUMMARY) -> dict[str, Any]:
    return json.loads(path.read_text("utf8"))


def _page_title(docs_dir: pathlib.Path, page: str) -> str:
    for line in (docs_dir / page).read_text("utf8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    raise ValueError(f"{page} has no '# ' title")


def benchmark_table(
    summary: dict[str, Any], page_dir: str = "", docs_dir: pathlib.Path = DOCS_DIR
) -> str:
    """The results table and, folded below it, the command behind each row.

    ``page_dir`` is the directory (relative to ``docs/``) of the page the table goes into, so
    that the links to the experiment log resolve from there. Plain Markdown and a ``<details>``
    element, so the table reads the same on the site and on GitHub.
    """
    rows = ["| " + " | ".join(BENCHMARK_COLUMNS) + " |", "|" + "---|" * len(BENCHMARK_COLUMNS)]
    commands = []
    for row in summary["rows"]:
        source = row["source"]
        link = posixpath.relpath(source["page"], page_dir or ".") + "#" + source["anchor"]
        verdict = row["beats_control"]
        cells = [
            f"{row['model']} ({row['data'].removesuffix(' images')})",
            row["method"],
            row["seeds"],
            f"{row['fpr95_before']:.1f} → {row['fpr95_after']:.1f}",
            fpr95_change(row),
            accuracy_change(row),
            f"{'**yes**' if verdict == 'yes' else verdict} ({row['control_detail']})",
            f"[{_page_title(docs_dir, source['page'])}]({link})",
        ]
        rows.append("| " + " | ".join(cells) + " |")
        commands.append(f"- {row['model']}, {row['data']}, {row['method']}: `{source['command']}`")
    folded = [
        '<details class="info" markdown>',
        "<summary>The command behind each row</summary>",
        "",
        *commands,
        "",
        "</details>",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(folded)


def fill_benchmark_tables(
    markdown: str, page_dir: str = "", docs_dir: pathlib.Path = DOCS_DIR
) -> str:
    """Every region of ``markdown`` from a ``<!-- benchmark-table -->`` line to a
    ``<!-- /benchmark-table -->`` line, its content replaced by :func:`benchmark_table`."""
    start = re.compile(rf"^{re.escape(BENCHMARK_MARKER)}$", re.M)
    if not start.search(markdown):
        return markdown
    table = benchmark_table(
        load_benchmark_summary(docs_dir / "data" / "benchmark_summary.json"), page_dir, docs_dir
    )
    region = re.compile(
        rf"^{re.escape(BENCHMARK_MARKER)}$.*?^{re.escape(BENCHMARK_END)}$", re.S | re.M
    )
    if len(region.findall(markdown)) != len(start.findall(markdown)):
        raise ValueError(
            f"{BENCHMARK_MARKER} without its closing {BENCHMARK_END} on a line of its own"
        )
    filled = f"{BENCHMARK_MARKER}\n\n{table}\n\n{BENCHMARK_END}"
    return region.sub(lambda _: filled, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, exports_table())
    page, config = kwargs.get("page"), kwargs.get("config")
    page_dir = posixpath.dirname(page.file.src_uri) if page is not None else ""
    docs_dir = pathlib.Path(config["docs_dir"]) if config is not None else DOCS_DIR
    return fill_benchmark_tables(markdown, page_dir, docs_dir)


def main(argv: list[str] | None = None) -> int:
    """``python scripts/mkdocs_hooks.py [--check]``: write the benchmark table into the pages
    that hold its markers, so that it reads on GitHub too (the site renders it either way).
    ``--check`` writes nothing and fails when a page is out of date."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(DOCS_DIR.rglob("*.md")):
        text = path.read_text("utf8")
        page_dir = posixpath.dirname(path.relative_to(DOCS_DIR).as_posix())
        filled = fill_benchmark_tables(text, page_dir)
        if filled != text:
            stale.append(path)
            if not args.check:
                path.write_text(filled, "utf8")
    for path in stale:
        print(f"{'out of date' if args.check else 'updated'}: {path.relative_to(DOCS_DIR.parent)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
