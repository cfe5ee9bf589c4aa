"""The loss constraint ξ: the masked-model estimate and the recipes that choose ξ."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodunleash import OODUnleash
from oodunleash.config import Masked
from oodunleash.masks.layer_masks import LayerMasks, topk_mask
from tests.helpers.toys import ConvNet, labelled_loader, state_copy


def test_loss_constraint_matches_hand_computation_and_leaves_model_untouched():
    model = ConvNet(dropout=0.5)
    model.train()  # estimate must switch to eval mode (dropout off, BN running stats)
    loader = labelled_loader()
    state = state_copy(model)
    unleashed = OODUnleash(model, seed=7)
    xi = unleashed.estimate_loss_constraint(loader, keep_ratio=0.7, progress=False)

    reference = copy.deepcopy(model).eval()
    masks = LayerMasks(reference, keep_ratio=0.7, seed=7)
    with torch.no_grad():
        for name in masks.layer_names:
            reference.get_submodule(name).weight.mul_(topk_mask(masks.layer_scores(name), 0.7))
        losses = [F.cross_entropy(reference(x), y, reduction="sum") for x, y in loader]
    expected = float(sum(losses) / len(loader.dataset))
    assert xi == pytest.approx(expected, rel=1e-6)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model.conv) is nn.Conv2d


def test_fit_sets_constraint_by_recipe_when_not_given():
    from oodunleash import mean_cross_entropy

    loader = labelled_loader()
    torch.manual_seed(0)
    model = ConvNet(dropout=0.5)
    OODUnleash(model).fit(loader, epochs=30, lr=0.1, flooding=False, progress=False)
    state = state_copy(model)
    # default: 2x the model's own training loss (eval mode)
    expected = 2 * mean_cross_entropy(model, loader)
    unleashed = OODUnleash(model, seed=3).fit(loader, epochs=1, progress=False)
    assert unleashed.loss_constraint_ == pytest.approx(expected)
    # the paper's recipe: the masked-model estimate
    model.load_state_dict(state)
    masked = OODUnleash(model, seed=3, constraint=Masked(0.9))
    expected = masked.estimate_loss_constraint(loader, progress=False)
    masked.fit(loader, epochs=1, progress=False)
    assert masked.loss_constraint_ == pytest.approx(expected)
    with pytest.raises(ValueError, match="constraint must be 'relative' or 'masked'"):
        OODUnleash(model, constraint="paper")
