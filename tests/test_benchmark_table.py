"""The benchmark's headline numbers live in one file, ``docs/data/benchmark_summary.json``.

The Benchmarks page includes a table built from it at site-build time (``scripts/mkdocs_hooks.py``);
the README and the docs pages that quote results write the numbers by hand. These tests keep the
three in agreement: the rendered table says what the file says, every quoted "before → after"
pair is a row of the file, and every row names a section of the experiment log that reports
those numbers and the command behind them.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from markdown.extensions.toc import slugify

from tests.helpers.scripts import ROOT, load_script

DOCS = ROOT / "docs"
SUMMARY = DOCS / "data" / "benchmark_summary.json"
PAGE = DOCS / "benchmarks.md"

#: "61.4 → 36.5", optionally followed by " (−41%)" and " at −0.51 points".
QUOTE = re.compile(
    r"(?P<before>\d+\.\d) → (?P<after>\d+\.\d)"
    r"(?: \((?P<change>[−+]\d+)%\))?"
    r"(?: at (?P<points>[−+]?\d+\.\d+) points)?"
)
#: "cut the mean FPR95 by 51%": a relative change quoted in prose.
BY_PERCENT = re.compile(r"\bby (\d+)%")

#: ``(file, heading of the section that quotes results)``: what a reader sees first.
QUOTING_SECTIONS = [
    (ROOT / "README.md", "## Should I use it?"),
    (ROOT / "README.md", "## Results"),
    (DOCS / "index.md", "## Should I use it?"),
    (DOCS / "getting-started.md", "## Should I use it?"),
    (DOCS / "concepts.md", "## UM and UMAP"),
]

#: Rows the README's Results must quote: the default of each method on each model.
README_ROWS = {
    "small_cnn_um",
    "small_cnn_umap",
    "small_cnn_dice",
    "small_cnn_knn",
    "small_cnn_um_dice",
    "resnet18_12k_um",
    "resnet18_12k_react",
    "resnet18_12k_knn",
    "resnet18_full_knn",
    "resnet18_full_um",
    "resnet18_full_umap",
}


def _rows() -> list[dict]:
    return json.loads(SUMMARY.read_text("utf8"))["rows"]


def _minus(text: str) -> float:
    return float(text.replace("−", "-"))


def _change_percent(row: dict) -> int:
    return round(100 * (row["fpr95_after"] - row["fpr95_before"]) / row["fpr95_before"])


def _headings(text: str) -> list[tuple[int, int, str]]:
    """``(line index, level, title)`` of the headings, code blocks (``# comment``) left out."""
    found, fenced = [], False
    for i, line in enumerate(text.split("\n")):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^(#+) (.*)", line)):
            found.append((i, len(match[1]), match[2].strip()))
    return found


def _section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of the same or a higher level."""
    lines = text.split("\n")
    headings = _headings(text)
    matches = [(i, lv) for i, lv, title in headings if "#" * lv + " " + title == heading]
    assert matches, f"no heading {heading!r}"
    start, level = matches[0]
    end = next((i for i, lv, _ in headings if i > start and lv <= level), len(lines))
    return "\n".join(lines[start:end])


def _section_by_anchor(text: str, anchor: str) -> str:
    for _, level, title in _headings(text):
        if slugify(title, "-") == anchor:
            return _section(text, "#" * level + " " + title)
    raise AssertionError(f"no heading with anchor #{anchor}")


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.split("\n") if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]


def _outside_generated_region(text: str) -> str:
    hooks = load_script("scripts/mkdocs_hooks.py")
    before, _, rest = text.partition(hooks.BENCHMARK_MARKER)
    return before + rest.partition(hooks.BENCHMARK_END)[2]


def test_page_holds_the_table_generated_from_the_json_and_no_numbers_of_its_own() -> None:
    hooks = load_script("scripts/mkdocs_hooks.py")
    text = PAGE.read_text("utf8")
    assert text.count(hooks.BENCHMARK_MARKER) == text.count(hooks.BENCHMARK_END) == 1
    assert hooks.fill_benchmark_tables(text) == text, (
        "docs/benchmarks.md is out of date with docs/data/benchmark_summary.json: "
        "run python scripts/mkdocs_hooks.py"
    )
    assert not QUOTE.search(_outside_generated_region(text)), (
        "numbers belong in docs/data/benchmark_summary.json"
    )


def test_site_build_replaces_a_stale_table() -> None:
    hooks = load_script("scripts/mkdocs_hooks.py")
    stale = f"# Page\n\n{hooks.BENCHMARK_MARKER}\n| old | 99.9 → 0.1 |\n{hooks.BENCHMARK_END}\n"
    rendered = hooks.on_page_markdown(stale)
    assert "99.9 → 0.1" not in rendered
    assert all(
        f"{row['fpr95_before']:.1f} → {row['fpr95_after']:.1f}" in rendered for row in _rows()
    )
    assert rendered.startswith("# Page\n") and rendered.rstrip().endswith(hooks.BENCHMARK_END)


def test_an_unclosed_table_marker_is_an_error() -> None:
    hooks = load_script("scripts/mkdocs_hooks.py")
    with pytest.raises(ValueError, match="without its closing"):
        hooks.fill_benchmark_tables(f"{hooks.BENCHMARK_MARKER}\n| table |\n")


def test_rendered_table_matches_the_json() -> None:
    hooks = load_script("scripts/mkdocs_hooks.py")
    rendered = hooks.on_page_markdown(PAGE.read_text("utf8"))
    table = _table_rows(rendered)
    rows = _rows()
    assert len(table) == len(rows)
    for cells, row in zip(table, rows, strict=True):
        model, method, seeds, fpr95, change, accuracy, verdict, link = cells
        assert model.startswith(row["model"]) and row["data"].split()[0] in model
        assert (method, seeds) == (row["method"], row["seeds"])
        before, after = (_minus(x) for x in fpr95.split(" → "))
        assert (before, after) == (row["fpr95_before"], row["fpr95_after"])
        assert _minus(change.rstrip("%")) == _change_percent(row)
        if row["accuracy_change"] is None:
            assert accuracy == row["accuracy_detail"]
        else:
            assert _minus(accuracy) == pytest.approx(row["accuracy_change"])
        assert verdict.strip("*").startswith(row["beats_control"])
        assert row["control_detail"] in verdict
        assert link.endswith(f"({row['source']['page']}#{row['source']['anchor']})")
        assert row["source"]["command"] in rendered


def test_links_resolve_from_a_page_inside_the_log() -> None:
    table = load_script("scripts/mkdocs_hooks.py").benchmark_table(
        json.loads(SUMMARY.read_text("utf8")), "benchmarks"
    )
    row = _rows()[0]
    expected = row["source"]["page"].removeprefix("benchmarks/") + "#" + row["source"]["anchor"]
    assert f"]({expected})" in table


@pytest.mark.parametrize("row", _rows(), ids=lambda row: row["id"])
def test_each_row_is_reported_by_the_section_it_names(row: dict) -> None:
    """The row's numbers, its control's numbers and its command's output folder are in the
    experiment-log section the row links to."""
    page = (DOCS / row["source"]["page"]).read_text("utf8")
    section = _section_by_anchor(page, row["source"]["anchor"])
    numbers = [row["fpr95_before"], row["fpr95_after"]]
    numbers += [float(x) for x in re.findall(r"\d+\.\d", row["control_detail"])]
    for number in numbers:
        assert f"{number:.1f}" in section, f"{number} is not in {row['source']['page']}"
    output = re.search(r"--(?:out|run) (\S+)", row["source"]["command"])
    assert output is not None and output[1] in section
    assert row["beats_control"] in {"yes", "no", "n/a"}
    assert row["accuracy_change"] is not None or row.get("accuracy_detail")


@pytest.mark.parametrize(("path", "heading"), QUOTING_SECTIONS, ids=lambda x: getattr(x, "name", x))
def test_quoted_numbers_are_rows_of_the_json(path: pathlib.Path, heading: str) -> None:
    section = _section(path.read_text("utf8"), heading)
    rows = {(row["fpr95_before"], row["fpr95_after"]): row for row in _rows()}
    changes = {abs(_change_percent(row)) for row in _rows()}
    for match in QUOTE.finditer(section):
        pair = (float(match["before"]), float(match["after"]))
        assert pair in rows, f"{path.name}: {match[0]!r} is no row of {SUMMARY.name}"
        row = rows[pair]
        if match["change"]:
            assert _minus(match["change"]) == _change_percent(row), match[0]
        if match["points"]:
            assert _minus(match["points"]) == pytest.approx(row["accuracy_change"]), match[0]
    for match in BY_PERCENT.finditer(section):
        assert int(match[1]) in changes, f"{path.name}: {match[0]!r} is no change in the JSON"


def test_readme_results_quote_the_headline_rows() -> None:
    results = _section((ROOT / "README.md").read_text("utf8"), "## Results")
    quoted = {(float(m["before"]), float(m["after"])) for m in QUOTE.finditer(results)}
    missing = [
        row["id"]
        for row in _rows()
        if row["id"] in README_ROWS and (row["fpr95_before"], row["fpr95_after"]) not in quoted
    ]
    assert not missing, f"README's Results does not quote {missing}"
