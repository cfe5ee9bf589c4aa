"""SCALE (Xu, Lian, Wang & Li, ICLR 2024): re-scale the penultimate features, then energy.

Every sample's penultimate features ``a`` are multiplied by ``exp(sum(a) / sum(top(a)))``,
where ``top(a)`` keeps the largest ``100 - percentile`` % of them; unlike ASH-S nothing is
pruned, the top values only set the factor. The score is the energy of the head's logits on
the scaled features. It reads the cached features (no extra pass, no gradients, no fit) and
assumes non-negative (post-ReLU) features, as the paper does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, register_score
from oodunleash.scores.logits import energy

__all__ = ["SCALE", "scale_factor"]


def scale_factor(features: Tensor, percentile: float) -> Tensor:
    """``exp(sum(a) / sum(top(a)))`` per row, ``top`` keeping the largest
    ``n - round(n * percentile / 100)`` of the ``n`` values (at least one); 1 for a row
    whose top values sum to zero or less.

    Example:
        >>> scale_factor(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 50)  # exp(10 / 7)
        tensor([4.1727])
    """
    flat = features.float().flatten(1)
    n = flat.shape[1]
    k = max(1, n - int(np.round(n * percentile / 100.0)))
    kept = flat.topk(k, dim=1).values.sum(dim=1)
    # An all-zero row has nothing to scale: factor 1 rather than exp(0 / 0).
    ratio = torch.where(kept > 0, flat.sum(dim=1) / kept.clamp(min=1e-30), 0.0)
    return torch.exp(ratio)


@register_score
class SCALE(OODScore):
    """SCALE (Xu et al., ICLR 2024): energy of the logits of the penultimate features scaled
    by :func:`scale_factor`. ``percentile`` 85, the paper's ImageNet/ResNet-50 setting (and
    OpenOOD's default)."""

    name = "scale"
    requires = frozenset({"features", "head"})
    grid = ("percentile", "p", (65.0, 85.0, 95.0))

    def __init__(self, percentile: float = 85.0) -> None:
        if not 0 <= percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}.")
        self.percentile = float(percentile)

    def score(self, data: FeatureSet) -> Tensor:
        feats = data.require("features", self.name).float()
        data.require("head", self.name)
        scaled = feats * scale_factor(feats, self.percentile)[:, None]
        return energy(data.logits_from_features(scaled))
