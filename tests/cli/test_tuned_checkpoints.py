"""Whatever ``tune`` picks scores the same in memory, after ``save_pretrained`` /
``from_pretrained`` with the default score, and through ``oodunleash score`` / ``evaluate``
without ``--score(s)``: every registered score, every variant tune expands, and a fine-tune.

The model is timm's ``test_resnet`` at 32 px with random weights, on the CLI tests' image
folders: what is checked is that the chosen score travels, not that it detects well.
"""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import timm
import timm.data
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash, tune
from oodunleash.scores import ScoreSpec, get_score
from oodunleash.tuning import score_variants
from oodunleash.tuning.reader import choose_score
from tests.cli.commands import model_args, read_csv, run

PREPROCESSING = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
TRAIN_SIZE = 12  # the `data` fixture's train/ folder: 6 red, 6 blue
#: Every variant tune reads a model with: each registered score, the grid's values.
VARIANTS = list(score_variants(None, TRAIN_SIZE))
TUNE = {"finetunes": [], "proxy_size": 8, "progress": False, "verbose": False}


def _batch(paths: list[pathlib.Path]) -> torch.Tensor:
    transform = timm.data.create_transform(**PREPROCESSING, crop_pct=1.0)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _tolerance(label: str) -> float:
    # KNN's bank is saved in float16 (its save_dtype): distances move by about 1e-3.
    return 1e-2 if ScoreSpec.parse(label).name == "knn" else 1e-4


@pytest.fixture(scope="module")
def setting(data):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    classes = sorted(p.name for p in (data / "train").iterdir())
    loaders = {}
    for split in ("train", "val"):
        paths = sorted((data / split).glob("*/*.png"))
        labels = torch.tensor([classes.index(p.parent.name) for p in paths])
        loaders[split] = DataLoader(TensorDataset(_batch(paths), labels), batch_size=4)
    inputs = sorted((data / "ood_loose").glob("*.png"))
    return model, loaders, classes, inputs


def _check_travels(unleashed, label, folder, data, classes, inputs, capsys):
    """In memory == from_pretrained == ``oodunleash score`` CSV; ``evaluate`` runs on it."""
    unleashed.save_pretrained(folder, class_names=classes, **PREPROCESSING)
    config = json.loads((folder / "oodunleash_config.json").read_text())
    assert ScoreSpec.from_json(config["params"]["score"]).label == label
    assert f"Default OOD score | `{label}`" in (folder / "README.md").read_text()

    loaded = OODUnleash.from_pretrained(folder)
    assert ScoreSpec.of(loaded.default_score).label == label
    # The images as the CLI reads them: the preprocessing the checkpoint records.
    recorded = timm.data.resolve_data_config({}, model=loaded.model)
    transform = timm.data.create_transform(**recorded)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in inputs])
    expected = unleashed.score(x)
    tol = _tolerance(label)
    assert loaded.score(x).tolist() == pytest.approx(expected.tolist(), rel=tol, abs=tol)

    code, out, err = run(["score", *model_args(str(folder)), *map(str, inputs)], capsys)
    assert code == 0, err
    assert [v for _, v in read_csv(out)] == pytest.approx(expected.tolist(), rel=tol, abs=tol)
    code, out, err = run(
        [
            "evaluate",
            *model_args(str(folder)),
            "--id-dir",
            str(data / "val"),
            "--ood-dir",
            f"loose={data / 'ood_loose'}",
        ],
        capsys,
    )
    assert code == 0, err
    assert label in out


@pytest.mark.parametrize("label", VARIANTS)
def test_the_chosen_score_travels(label, setting, data, tmp_path, capsys):
    model, loaders, classes, inputs = setting
    only = {label: ScoreSpec.parse(label)}  # a bare name would expand to the grid
    result = tune(model, loaders["train"], loaders["val"], scores=only, **TUNE)
    assert result.best_score == label
    assert ScoreSpec.of(result.best.default_score).label == label
    folder = tmp_path / "tuned"
    _check_travels(result.best, label, folder, data, classes, inputs, capsys)


@pytest.mark.parametrize("finetune", ["um control", "umap control"])
def test_a_fine_tuned_choice_travels(finetune, setting, data, tmp_path, capsys):
    model, loaders, classes, inputs = setting
    labels = ["knn k=1", "react p=85", "energy"]
    result = tune(
        model,
        loaders["train"],
        loaders["val"],
        **{**TUNE, "finetunes": [finetune], "scores": labels, "epochs": 1, "keep_all": True},
    )
    unleashed = result.unleashed[finetune]
    assert unleashed.is_fitted
    _each_choice_travels(unleashed, labels, tmp_path, data, classes, inputs, capsys)


def _each_choice_travels(unleashed, labels, tmp_path, data, classes, inputs, capsys):
    """Each of ``labels`` made the default as tune would leave it had it won, then checked
    to travel."""
    every = dict(unleashed.fitted_scores_)
    for label in labels:
        unleashed.fitted_scores_ = every
        choose_score(unleashed, label, ScoreSpec.parse(label), keep_all=False)
        assert list(unleashed.fitted_scores_) == [label]
        folder = tmp_path / label.replace(" ", "_")
        _check_travels(unleashed, label, folder, data, classes, inputs, capsys)


def test_a_checkpoint_of_the_earlier_layout_still_scores_with_its_default(setting, tmp_path):
    """Before ScoreSpec, tune stored the chosen KNN under ``"knn"`` and recorded the default
    as its full config: the default must still find that fitted bank."""
    model, loaders, _, inputs = setting
    old = OODUnleash(copy.deepcopy(model), score="energy")
    old.fit_scores(loaders["train"], {"knn": get_score("knn", k=1)}, progress=False)
    old.default_score = old.fitted_scores_["knn"]  # the fitted instance, as tune set it
    folder = old.save_pretrained(tmp_path / "old", **PREPROCESSING)
    config_path = folder / "oodunleash_config.json"
    config = json.loads(config_path.read_text())
    config["params"]["score"] = {"name": "knn", "config": get_score("knn", k=1).get_config()}
    config_path.write_text(json.dumps(config))

    loaded = OODUnleash.from_pretrained(folder)
    x = _batch(inputs)
    assert loaded.default_score == ScoreSpec("knn", {"k": 1})
    expected = old.score(x)
    assert loaded.score(x).tolist() == pytest.approx(expected.tolist(), rel=1e-2, abs=1e-2)


def test_a_fused_choice_travels(setting, data, tmp_path, capsys):
    """A fused variant tune built from cached values saves as a fitted ``fused`` score under
    its label (the members joined by " + ") and scores the same after reload and in the CLI."""
    model, loaders, classes, inputs = setting
    singles = ["energy", "msp", "mahalanobis"]
    result = tune(
        model,
        loaders["train"],
        loaders["val"],
        **{**TUNE, "scores": singles, "keep_all": True},
    )
    unleashed = result.unleashed["unchanged"]
    fused = [label for label in result.candidates["unchanged"].metrics if label not in singles]
    assert len(fused) == 4
    chosen = fused[::3]  # a pair and the triple
    assert all(ScoreSpec.parse(label).name == "fused" for label in chosen)
    _each_choice_travels(unleashed, chosen, tmp_path, data, classes, inputs, capsys)
