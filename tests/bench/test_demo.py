"""`oodunleash demo --quick` end to end on scikit-learn's digits (no download)."""

from __future__ import annotations

import json
import math

import pytest

from oodunleash.bench.datasets import fashion_mnist_available
from oodunleash.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--dataset", "digits", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Dataset: digits" in printed
    assert "NOT representative" in printed

    for name in ("results.json", "results.md", "tune.md", "model.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("curve.png", "compare.png", "tune.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "digits" and results["quick"] is True
    assert len(results["curve"]) == results["epochs"]
    tuned = results["tune"]
    # tune saw proxy OOD built from validation images only, never a test OOD set.
    assert tuned["proxy"] is True
    assert not set(tuned["ood_sets"]) & {"near", "photos", "fashion-mnist"}
    # Quick mode tries UM and its control; a candidate tune drops (a ξ above ln(6) on this
    # briefly trained model) is said so.
    assert set(tuned["candidates"]) | set(tuned["dropped"]) == {"unchanged", "um", "um control"}
    for name in tuned["dropped"]:
        assert f"Not run: {name} (" in printed

    # The validation table, the chosen name, and the test comparison are all printed.
    assert "| candidate | score | val acc |" in printed
    assert f"tune chose: {tuned['best_name']}" in printed
    chosen_row = f"| tune's choice: {tuned['best_name']} |"
    assert "| final model + energy |" in printed and chosen_row in printed
    assert "has mean FPR95" in printed

    # The test comparison uses the chosen candidate's chosen score, on the real test sets.
    comparison = results["comparison"]
    assert list(comparison)[0] == "final model + energy"
    chosen = comparison[f"tune's choice: {tuned['best_name']}"]
    # The digits demo adds Fashion-MNIST as a far-OOD set only where its files are installed.
    expected_sets = {"near", "photos", "gaussian", "uniform"}
    if fashion_mnist_available():
        expected_sets.add("fashion-mnist")
    assert set(chosen["metrics"]) == expected_sets
    final = results["results"]["final model"]
    assert comparison["final model + energy"]["metrics"] == final["metrics"]["energy"]
    # The library-defaults row (UM + KNN) is there exactly when UM ran (here it was dropped).
    assert ("library defaults: um + knn" in comparison) == ("um" in results["results"])

    # The before/after table: every candidate tune fitted, on the common scores.
    table = (out / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert {"final model", "um control"} <= set(rows)
    for label, res in results["results"].items():
        assert 0 <= res["accuracy"] <= 100, label
        assert set(res["metrics"]) == {"msp", "energy", "maxlogit", "knn"}
        for score, sets in res["metrics"].items():
            for ood, metrics in sets.items():
                for key, value in metrics.items():
                    assert math.isfinite(value) and 0 <= value <= 100, (label, score, ood, key)
    # The demo trains a real classifier: well above chance (1/6) on held-out digits.
    assert final["accuracy"] > 50


def test_demo_script_entry_point_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
