"""fit's input checks (oodunleash.finetune.fitting): bad inputs are named before anything changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from tests.helpers.fits import assert_same, dataset, make_net, snapshot, wrapper
from tests.helpers.toys import ConvNet, labelled_loader


def _generator_loader():
    return (batch for batch in DataLoader(dataset(), batch_size=16))


BAD_FITS = [
    (
        "max_grad_norm zero",
        {"training": {"max_grad_norm": 0}},
        ValueError,
        "max_grad_norm must be a positive",
    ),
    ("max_grad_norm negative", {"training": {"max_grad_norm": -1.0}}, ValueError, "max_grad_norm"),
    ("max_grad_norm nan", {"training": {"max_grad_norm": math.nan}}, ValueError, "max_grad_norm"),
    ("max_grad_norm text", {"training": {"max_grad_norm": "1"}}, ValueError, "max_grad_norm"),
    ("generator loader", {"loader": "generator"}, TypeError, "one-shot iterator.*DataLoader"),
    ("iterator loader", {"loader": "iterator"}, TypeError, "one-shot iterator.*list"),
    ("not iterable", {"loader": 5}, TypeError, "loader must be an iterable"),
    ("resume without dir", {"resume": True}, ValueError, "checkpoint_dir"),
    ("outliers with dir", {"checkpoint_dir": "x", "outlier_loader": []}, ValueError, "outlier"),
    (
        "train_norms for UM",
        {"training": {"train_norms": True}},
        ValueError,
        "train_norms applies to UMAP",
    ),
    ("fully frozen UM", {"frozen": True}, ValueError, "fully frozen.*method='umap'"),
    ("bad lr", {"lr": "fast"}, TypeError, "lr must be a number"),
    ("training not a dict", {"training": 0.1}, TypeError, "training must be a dict.*amp"),
    (
        "training typo",
        {"training": {"weight_decy": 0.0}},
        ValueError,
        "Did you mean 'weight_decay'",
    ),
    ("lr in training", {"training": {"lr": 0.1}}, ValueError, "fit\\(loader, epochs, lr\\)"),
]


@pytest.mark.parametrize(
    ("options", "error", "match"), [c[1:] for c in BAD_FITS], ids=[c[0] for c in BAD_FITS]
)
def test_bad_fit_inputs_are_named_and_change_nothing(options, error, match, tmp_path):
    options = dict(options)
    data = dataset()
    unleashed = wrapper("um", True, data)
    if options.pop("frozen", False):
        for p in unleashed.model.parameters():
            p.requires_grad_(False)
    before = snapshot(unleashed)
    loader = options.pop("loader", DataLoader(data, batch_size=16))
    if loader == "generator":
        loader = _generator_loader()
    elif loader == "iterator":
        loader = iter([data.tensors])
    if options.get("checkpoint_dir") == "x":
        options["checkpoint_dir"] = tmp_path
    with pytest.raises(error, match=match):
        unleashed.fit(loader, epochs=1, progress=False, **options)
    assert_same(before, snapshot(unleashed))
    assert not any(tmp_path.iterdir())


def test_progress_prints_a_one_line_summary(capsys):
    OODUnleash(make_net(), constraint=0.3).fit(
        DataLoader(dataset(), batch_size=16), epochs=2, progress=True
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("UM fit in ") and "ξ 0.3" in lines[0]
    assert "training CE" in lines[0] and "accuracy" in lines[0] and "(epoch 1 -> 2)" in lines[0]


def test_loader_without_labels_is_rejected():
    images_only = DataLoader(torch.randn(8, 1, 8, 8), batch_size=4)
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        OODUnleash(ConvNet(dropout=0.5)).fit(images_only, progress=False)


def test_labels_outside_model_classes_are_rejected():
    loader = labelled_loader(classes=5)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
        OODUnleash(ConvNet(3, dropout=0.5), constraint=0.1).fit(loader, progress=False)


def test_model_output_shape_is_checked():
    class Bad(ConvNet):
        def forward(self, x):
            return super().forward(x).unsqueeze(1)

    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\)"):
        OODUnleash(Bad()).fit(labelled_loader(), progress=False)


def test_empty_loader_is_rejected():
    empty = DataLoader(TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no batches"):
        OODUnleash(ConvNet(dropout=0.5), constraint=0.1).fit(empty, progress=False)
