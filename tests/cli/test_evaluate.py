"""``oodunleash list-scores``, ``evaluate`` and ``score`` (oodunleash.cli._evaluate)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import oodunleash
from oodunleash import OODUnleash
from tests.cli.commands import model_args, read_csv, run


def test_list_scores(capsys):
    code, out, _ = run(["list-scores"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert sorted(lines) == oodunleash.list_scores()
    assert "--fit-dir" in lines["knn"] and "--fit-dir" not in lines["energy"]


# --------------------------------------------------------------------------- evaluate / score
def test_evaluate_prints_a_table_and_writes_json(checkpoint, data, tmp_path, capsys):
    report = tmp_path / "results.json"
    code, out, err = run(
        [
            "evaluate",
            *model_args(str(checkpoint)),
            "--id-dir",
            str(data / "val"),
            "--ood-dir",
            f"loose={data / 'ood_loose'}",
            "--ood-dir",
            f"nested={data / 'ood_nested'}",
            "--fit-dir",
            str(data / "train"),
            "--scores",
            "energy",
            "knn",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0, err
    assert "AUROC" in out and "knn" in out and "nested" in out
    results = json.loads(report.read_text())
    assert set(results) == {"energy", "knn", "id_accuracy"}
    assert set(results["knn"]) == {"loose", "nested", "average"}
    assert 0 <= results["knn"]["loose"]["auroc"] <= 1
    assert 0 <= results["id_accuracy"] <= 1


def test_score_csv_matches_the_python_api(checkpoint, data, tmp_path, capsys):
    import timm.data

    out = tmp_path / "scores.csv"
    single = data / "val" / "red" / "img0.png"
    code, _, err = run(
        [
            "score",
            *model_args(str(checkpoint)),
            str(data / "ood_loose"),
            str(single),
            "--score",
            "msp",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    rows = read_csv(out.read_text())
    expected_paths = sorted((data / "ood_loose").glob("*.png")) + [single]
    assert [p for p, _ in rows] == [str(p) for p in expected_paths]
    # The same images through the Python API and the checkpoint's recorded preprocessing.
    unleashed = OODUnleash.from_pretrained(checkpoint)
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({}, model=unleashed.model)
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in expected_paths])
    expected = unleashed.score(batch, "msp")
    assert [v for _, v in rows] == pytest.approx(expected.tolist(), rel=1e-4)
