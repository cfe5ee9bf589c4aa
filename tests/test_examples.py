"""The reporting parts of the example scripts (their heavy parts are benchmarks, run by hand)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_script


def _result(fpr: float, accuracy: float) -> dict:
    metrics = {"auroc": 90.0, "fpr95": fpr}
    scores = {label: {"near": dict(metrics), "noise": dict(metrics)} for label in SCORE_LABELS}
    return {"val": {**scores, "accuracy": accuracy}, "test": {**scores, "accuracy": accuracy}}


posthoc = load_script("examples/posthoc_scores.py")
SCORE_LABELS = list(posthoc.SCORES)


def test_posthoc_summary_means_over_the_seeds_every_variant_has(tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    (runs[0] / "posthoc_s0.json").write_text(json.dumps(_result(40.0, 94.0)))
    (runs[1] / "posthoc_s1.json").write_text(json.dumps(_result(60.0, 95.0)))
    (runs[0] / "um_posthoc_s0.json").write_text(json.dumps(_result(10.0, 93.0)))
    (runs[1] / "um_posthoc_s1.json").write_text(json.dumps(_result(20.0, 94.0)))
    (runs[1] / "um_posthoc_s2.json").write_text(json.dumps(_result(90.0, 90.0)))  # no final
    chart = tmp_path / "chart.png"
    posthoc.summarize(runs, None, str(chart))
    out = capsys.readouterr().out
    assert "seeds [0, 1]" in out
    assert "| final model | energy | 94.50 | 90.0 | 50.0 ± 14.1 | 50.0 |" in out
    assert "| UM 3x | dice0.7 | 93.50 | 90.0 | 15.0 ± 7.1 | 15.0 |" in out
    assert "control" not in out  # no such files: that variant is left out
    assert chart.stat().st_size > 10_000
    with pytest.raises(SystemExit, match=r"some are missing: \{'final model': \[2\]\}"):
        posthoc.summarize(runs, [1, 2], None)


def test_posthoc_files_of_any_finetune_are_summarised_under_its_name(tmp_path, capsys):
    name = "umap/train_x3/lr0.1/ep10/keep0.9/model/norms"
    prefix = posthoc.file_prefix(name)
    assert prefix == "umap_train_x3_lr0.1_ep10_keep0.9_model_norms_"
    assert posthoc.file_prefix("um/train_x3/lr0.01/ep10") == "um_"  # --um's file names
    assert posthoc.file_prefix(None) == ""
    (tmp_path / "posthoc_s0.json").write_text(json.dumps(_result(40.0, 94.0)))
    umap = {**_result(12.0, 93.5), "finetune": name}
    (tmp_path / f"{prefix}posthoc_s0.json").write_text(json.dumps(umap))
    (tmp_path / "posthoc_summary.json").write_text("{}")  # not a per-seed file: ignored
    posthoc.summarize([tmp_path], None, None)
    out = capsys.readouterr().out
    assert f"| {name} | energy | 93.50 | 90.0 | 12.0 | 12.0 |" in out
    assert "| final model | energy | 94.00 |" in out


def test_compare_pytorch_ood_summary_means_over_the_seeds():
    compare = load_script("examples/compare_pytorch_ood.py")
    sets = ["near", "noise"]

    def run(seed, ours, fpr):
        maha = {k: 80.0 + seed for k in ["mean", *sets]}
        return {
            "settings": {"seed": seed},
            "test accuracy": 90.0 + seed,
            "against pytorch-ood": {
                "scale": {"ours": ours, "pytorch-ood": ours, "max gap": seed / 10, "spearman": 1.0},
                "mahalanobis, 120 training images": {"pytorch-ood": maha, "ledoit_wolf": maha},
            },
            "fusion": {
                "knn": {"mean": {"fpr95": fpr, "auroc": 90.0}}
                | {k: {"fpr95": fpr, "auroc": 90.0} for k in sets}
            },
        }

    table = compare.summarize([run(0, 80.0, 20.0), run(1, 90.0, 30.0)])
    assert "seeds [0, 1], test accuracy 90.50" in table
    assert "| scale | 85.00 | 85.00 | 0.1000 | 1.000000 |" in table
    assert "| ledoit_wolf | 80.5 | 80.5 | 80.5 |" in table
    assert "| knn | 25.0 | 90.0 | 25.0 | 25.0 |" in table
