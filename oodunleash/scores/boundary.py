"""fDBD (Liu & Qin, ICML 2024): distance of a sample's features to the decision boundaries.

In feature space the boundary between the predicted class ``p`` and a class ``c`` of a linear
head is the hyperplane ``l_p = l_c``; the feature's distance to it is
``|l_p - l_c| / ||w_p - w_c||``. fDBD averages this over the other classes and divides by the
feature's distance to the ID training mean, so a sample far from every boundary relative to
how far it lies from the ID data scores high (ID). It reads the cached features and the head
(no extra pass, no gradients); the fit stores the training mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, register_score

__all__ = ["FDBD", "boundary_distances"]


def boundary_distances(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Mean distance of each row of ``features`` to the decision boundaries between its
    predicted class and each other class of the linear head ``(weight, bias)``.

    Example:
        >>> w, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
        >>> boundary_distances(torch.tensor([[3.0, 1.0]]), w, b)  # |3 - 1| / sqrt(2)
        tensor([1.4142])
    """
    if weight.shape[0] < 2:
        raise ValueError("fDBD needs a head with at least two classes (decision boundaries).")
    weight, bias = weight.to(features.device, torch.float32), bias.to(features.device)
    logits = features.float() @ weight.T + bias.float()
    top, pred = logits.max(dim=1)
    gaps = top[:, None] - logits  # >= 0; zero for the predicted class itself
    w_pred = weight[pred]  # (n, dim)
    # ||w_p - w_c||^2 = ||w_p||^2 - 2 w_p.w_c + ||w_c||^2, without an (n, classes, dim) tensor.
    sq = (weight * weight).sum(dim=1)
    norms = (sq[pred][:, None] - 2 * w_pred @ weight.T + sq[None]).clamp(min=0).sqrt()
    norms = norms.scatter(1, pred[:, None], 1.0)  # the predicted class adds 0 / 1
    return (gaps / norms.clamp(min=1e-12)).sum(dim=1) / (weight.shape[0] - 1)


@register_score(aliases=["fdbd_ood"])
class FDBD(OODScore):
    """fDBD (Liu & Qin, ICML 2024): :func:`boundary_distances` over ``||z - mu_train||``.

    Args:
        normalizer: ``"distance"`` (the paper: distance to the ID training mean) or
            ``"norm"`` (the feature norm ``||z||``, which OpenOOD offers as the alternative
            it chooses between on validation).
    """

    name = "fdbd"
    requires = frozenset({"features", "head"})
    needs_fit = True
    state_keys = ("train_mean",)
    grid = ("normalizer", "n", ("distance", "norm"))

    def __init__(self, normalizer: str = "distance") -> None:
        if normalizer not in ("distance", "norm"):
            raise ValueError(f"normalizer must be 'distance' or 'norm', got {normalizer!r}.")
        self.normalizer = normalizer

    def fit(self, data: FeatureSet) -> FDBD:
        feats = data.require("features", self.name)
        self.train_mean = feats.double().mean(dim=0).float()
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name).float()
        head = data.require("head", self.name)
        distances = boundary_distances(feats, head.weight, head.bias)
        centre = self.train_mean.to(feats.device) if self.normalizer == "distance" else 0.0
        return distances / torch.linalg.vector_norm(feats - centre, dim=1).clamp(min=1e-8)
