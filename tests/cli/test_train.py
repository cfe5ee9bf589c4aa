"""``oodunleash fit`` and ``oodunleash tune`` (oodunleash.cli._train)."""

from __future__ import annotations

import json
import sys

import pytest

import oodunleash
from oodunleash import OODUnleash
from tests.cli.commands import (
    MODEL,
    QUICK_FIT,
    dirs,
    model_args,
    run,
)


# --------------------------------------------------------------------------- fit
def test_fit_saves_the_model_with_its_preprocessing(checkpoint, capsys):
    import timm.data

    reloaded = OODUnleash.from_pretrained(checkpoint)
    assert reloaded.method == "um" and reloaded.loss_constraint_ == pytest.approx(0.1)
    assert reloaded.model.num_classes == 2
    config = timm.data.resolve_data_config({}, model=reloaded.model)
    assert config["input_size"] == (3, 32, 32)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    timm_config = json.loads((checkpoint / "config.json").read_text())
    assert timm_config["label_names"] == ["blue", "red"]


def test_fit_umap_prints_a_summary_and_prunes(data, tmp_path, capsys):
    out = tmp_path / "umap"
    umap = ["--method", "umap", "--keep-ratio", "0.5", "--out", str(out)]
    code, stdout, err = run(
        ["fit", *model_args(MODEL), *dirs(data, val=None), *QUICK_FIT, *umap], capsys
    )
    assert code == 0, err
    assert stdout.startswith("preprocessing (timm's defaults for the architecture, overridden")
    assert "\nUMAP: ξ=0.1, last epoch CE" in stdout
    assert f"Saved: {out}" in stdout
    reloaded = OODUnleash.from_pretrained(out)
    assert reloaded.method == "umap"
    assert any(bool((p == 0).any()) for n, p in reloaded.model.named_parameters() if "conv" in n)


# --------------------------------------------------------------------------- tune
def test_tune_reports_a_missing_tune_function(data, monkeypatch, capsys):
    monkeypatch.delattr(oodunleash, "tune", raising=False)
    monkeypatch.setitem(sys.modules, "oodunleash.tune", None)  # nor the module
    code, _, err = run(
        ["tune", *model_args(MODEL), *dirs(data)],
        capsys,
    )
    assert code == 2 and "no tune()" in err


def test_tune_saves_the_best(data, tmp_path, capsys):
    tune = getattr(oodunleash, "tune", None)
    if not callable(tune):
        pytest.skip("oodunleash.tune is not available in this version")
    out, report = tmp_path / "best", tmp_path / "tune.json"
    code, stdout, err = run(
        [
            "tune",
            *model_args(MODEL),
            *dirs(data),
            "--ood-dir",
            f"loose={data / 'ood_loose'}",
            "--epochs",
            "1",
            "--time-budget",
            "30",
            "--json",
            str(report),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    # What is done to the images, then the plan, before any work.
    first, second = stdout.splitlines()[:2]
    assert first.startswith("preprocessing") and second.startswith("tune: the unchanged model and")
    chosen = json.loads(report.read_text())["best_name"]
    assert f"Chosen: {chosen}" in stdout
    assert f"Saved: {out}" in stdout  # a post-hoc choice is saved too, with its fitted score
    assert OODUnleash.from_pretrained(out).model.num_classes == 2


def test_tune_can_be_steered_and_lists_its_candidates(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["tune", "--help"], capsys)
    helped = capsys.readouterr().out
    assert (
        "'um control'" in helped
        and "knn k=1, knn k=10, knn;" in helped
        and "nci alpha=0," in helped
        and "--finetunes" in helped
        and "--fusion" in helped
    )
    out, report = tmp_path / "best", tmp_path / "tune.json"
    flags = ["--finetunes", "--scores", "knn k=1", "energy", "--json", str(report)]
    code, stdout, err = run(
        ["tune", *model_args(MODEL), *dirs(data), *flags, "--out", str(out)], capsys
    )
    assert code == 0, err
    assert "the unchanged model only (no fine-tune)" in stdout
    result = json.loads(report.read_text())
    assert list(result["candidates"]) == ["unchanged"]
    # the two single scores, and their fusion (--fusion 3 by default)
    assert set(result["candidates"]["unchanged"]["scores"]) == {
        "knn k=1",
        "energy",
        "knn k=1 + energy",
    }
    assert f"Saved: {out}" in stdout
    code, stdout, err = run(
        ["tune", *model_args(MODEL), *dirs(data), *flags, "--fusion", "0", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    result = json.loads(report.read_text())
    assert set(result["candidates"]["unchanged"]["scores"]) == {"knn k=1", "energy"}
    with pytest.raises(SystemExit) as exited:  # argparse refuses it before any work
        run(["tune", *model_args(MODEL), *dirs(data), "--fusion", "-1"], capsys)
    assert exited.value.code == 2
    assert "--fusion: must be 0 or a positive integer" in capsys.readouterr().err
