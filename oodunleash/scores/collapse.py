"""NCI (Liu & Qin, CVPR 2025): OOD detection through the lens of neural collapse.

Under neural collapse an ID feature, centred on the global ID mean ``mu_G``, points along its
predicted class's weight vector. NCI scores the alignment ``w_p . (z - mu_G) / ||z - mu_G||``
(``p``: the predicted class) plus ``alpha`` times the L1 norm of the feature (a filter for
far-OOD samples with small activations). It reads the cached features and the head (no extra
pass, no gradients); the fit stores ``mu_G``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, positive_option, register_score

__all__ = ["NCI"]


@register_score(aliases=["neural_collapse"])
class NCI(OODScore):
    """Neural-Collapse Inspired detector (Liu & Qin, CVPR 2025):
    ``w_p . (z - mu_G) / ||z - mu_G|| + alpha * ||z||_1``.

    ``alpha`` 1e-4, the default of the authors' OpenOOD implementation (it is chosen on
    validation among 1e-4 ... 1e-1 there; ``alpha = 0`` leaves the alignment alone).
    """

    name = "nci"
    requires = frozenset({"features", "head"})
    needs_fit = True
    state_keys = ("global_mean",)
    grid = ("alpha", "a", (0.0, 1e-4, 1e-3, 1e-2))

    def __init__(self, alpha: float = 1e-4) -> None:
        self.alpha = positive_option("alpha", alpha, allow_zero=True)

    def fit(self, data: FeatureSet) -> NCI:
        feats = data.require("features", self.name)
        self.global_mean = feats.double().mean(dim=0).float()
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name).float()
        head = data.require("head", self.name)
        weight = head.weight.to(feats.device, torch.float32)
        pred = data.logits_from_features(feats).argmax(dim=1)
        centred = feats - self.global_mean.to(feats.device)
        norm = torch.linalg.vector_norm(centred, dim=1).clamp(min=1e-12)
        alignment = (weight[pred] * centred).sum(dim=1) / norm
        return alignment + self.alpha * feats.abs().sum(dim=1)
