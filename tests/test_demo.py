"""`oodunleash demo --quick` end to end on scikit-learn's digits (no download)."""

from __future__ import annotations

import json
import math

import pytest

from oodunleash.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--dataset", "digits", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Dataset: digits" in printed

    for name in ("results.json", "results.md", "model.safetensors", "curve.png", "compare.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    table = (out / "results.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in table[2:]]
    assert rows == ["final model", "control (plain CE)", "UM", "UMAP"]
    assert "| final model |" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "digits"
    assert results["xi"] > 0 and math.isfinite(results["xi"])
    assert len(results["curve"]) == results["epochs"]
    for label, res in results["results"].items():
        assert 0 <= res["accuracy"] <= 100, label
        assert set(res["metrics"]) == {"msp", "energy", "maxlogit", "knn"}
        for score, sets in res["metrics"].items():
            assert "near" in sets and "photos" in sets
            for ood, metrics in sets.items():
                for key, value in metrics.items():
                    assert math.isfinite(value) and 0 <= value <= 100, (label, score, ood, key)
    # The demo trains a real classifier: well above chance (1/6) on held-out digits.
    assert results["results"]["final model"]["accuracy"] > 50


def test_demo_script_entry_point_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
