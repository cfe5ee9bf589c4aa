"""Unleashing Mask with outlier exposure (OE and Energy-OE)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash, mean_cross_entropy
from oodunleash.finetune.constraint import DEFAULT_CONSTRAINT_FACTOR


def _digits():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    return x, y


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _energy_auroc(model, id_x, ood_x):
    model.eval()
    with torch.no_grad():
        s_id = torch.logsumexp(model(id_x), 1)
        s_ood = torch.logsumexp(model(ood_x), 1)
    labels = [1] * len(s_id) + [0] * len(s_ood)
    return roc_auc_score(labels, torch.cat([s_id, s_ood]).numpy())


@pytest.fixture(scope="module")
def pretrained_digits():
    """A small MLP trained on digits 0-4; digits 5-7 are auxiliary outliers, 8-9 held out."""
    x, y = _digits()
    id_mask = y < 5
    aux = x[(y == 5) | (y == 6) | (y == 7)]
    held_out = x[y >= 8]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(int(id_mask.sum()), generator=g)
    id_x, id_y = x[id_mask][order], y[id_mask][order]
    loader = DataLoader(TensorDataset(id_x[:700], id_y[:700]), batch_size=64, shuffle=True)
    outliers = DataLoader(TensorDataset(aux), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    base = _net()
    OODUnleash(base, seed=0, constraint=1e-4).fit(loader, epochs=15, lr=0.1, progress=False)
    return base, loader, outliers, id_x[700:], held_out


@pytest.mark.parametrize("outlier_loss", ["oe", "energy"])
def test_outlier_exposure_separates_held_out_ood_better(pretrained_digits, outlier_loss):
    base, loader, outliers, test_x, held_out = pretrained_digits
    without, with_oe = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = {"epochs": 5, "lr": 0.05, "progress": False}
    OODUnleash(without, seed=1, constraint=0.05).fit(loader, **kwargs)
    fitted = OODUnleash(with_oe, seed=1, constraint=0.05).fit(
        loader, outlier_loader=outliers, **kwargs, training={"outlier_loss": outlier_loss}
    )
    assert "outlier_loss" in fitted.history_[0]
    assert fitted.train_config_.outlier_weight == (0.5 if outlier_loss == "oe" else 0.1)
    auroc_without = _energy_auroc(without, test_x, held_out)
    auroc_with = _energy_auroc(with_oe, test_x, held_out)
    assert auroc_with > auroc_without + 0.03, (auroc_with, auroc_without)


def test_umap_with_outliers_and_constraint_on_id_only(pretrained_digits):
    base, loader, outliers, _, _ = pretrained_digits
    model = copy.deepcopy(base)
    # the default recipe, on ID data
    expected_xi = DEFAULT_CONSTRAINT_FACTOR * mean_cross_entropy(model, loader)
    unleashed = OODUnleash(model, method="umap", seed=4)
    unleashed.fit(
        loader,
        epochs=1,
        outlier_loader=outliers,
        progress=False,
        training={"outlier_loss": "energy"},
    )
    # ξ comes from ID data alone: identical to the estimate without outliers
    assert unleashed.loss_constraint_ == pytest.approx(expected_xi)
    assert all(math.isfinite(h["outlier_loss"]) for h in unleashed.history_)
    assert unleashed.masks_ is not None


def test_bad_outlier_loss_name():
    with pytest.raises(ValueError, match="outlier_loss must be 'oe' or 'energy'"):
        OODUnleash(_net()).fit([], progress=False, training={"outlier_loss": "mixup"})
