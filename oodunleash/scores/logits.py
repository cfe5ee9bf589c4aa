"""Scores read from the logits alone: MSP, MaxLogit, Energy, Entropy, GEN.

All of them are computed in float32 from the cached logits; none needs fitting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oodunleash.features.collect import FeatureSet
from oodunleash.scores.base import OODScore, positive_option, register_score

__all__ = ["GEN", "MSP", "Energy", "Entropy", "MaxLogit", "energy"]


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` (higher = more ID).

    Example:
        >>> energy(torch.tensor([[0.0, 0.0]]))
        tensor([0.6931])
    """
    logits = logits.float()
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def _logits(data: FeatureSet, name: str) -> Tensor:
    return data.require("logits", name).float()


@register_score(aliases=["softmax", "baseline"])
class MSP(OODScore):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    Example:
        >>> MSP().score(FeatureSet(logits=torch.tensor([[0.0, 0.0], [10.0, 0.0]])))
        tensor([0.5000, 1.0000])
    """

    name = "msp"
    requires = frozenset({"logits"})

    def score(self, data: FeatureSet) -> Tensor:
        return torch.softmax(_logits(data, self.name), dim=1).max(dim=1).values


@register_score(aliases=["max_logit", "mls"])
class MaxLogit(OODScore):
    """Maximum logit (Hendrycks et al., ICML 2022, "Scaling OOD detection")."""

    name = "maxlogit"
    requires = frozenset({"logits"})

    def score(self, data: FeatureSet) -> Tensor:
        return _logits(data, self.name).max(dim=1).values


@register_score(aliases=["ebo"])
class Energy(OODScore):
    """Energy score (Liu et al., NeurIPS 2020): ``T * logsumexp(logits / T)``, T = 1."""

    name = "energy"
    requires = frozenset({"logits"})

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = positive_option("temperature", temperature)

    def score(self, data: FeatureSet) -> Tensor:
        return energy(_logits(data, self.name), self.temperature)


@register_score
class Entropy(OODScore):
    """Negative predictive entropy ``sum_c p_c log p_c`` (higher = more confident = more ID)."""

    name = "entropy"
    requires = frozenset({"logits"})

    def score(self, data: FeatureSet) -> Tensor:
        log_p = torch.log_softmax(_logits(data, self.name), dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


@register_score
class GEN(OODScore):
    """Generalized entropy (Liu, Lochman & Zach, CVPR 2023).

    ``-sum_{top M} p^γ (1 - p)^γ`` over the ``M`` largest softmax probabilities, γ = 0.1,
    M = 100 (all classes when there are fewer).
    """

    name = "gen"
    requires = frozenset({"logits"})

    def __init__(self, gamma: float = 0.1, top_m: int = 100) -> None:
        if top_m < 1:
            raise ValueError(f"top_m must be at least 1, got {top_m}.")
        self.gamma = positive_option("gamma", gamma)
        self.top_m = int(top_m)

    def score(self, data: FeatureSet) -> Tensor:
        # float64: 1 - p loses most digits in float32 for confident predictions.
        probs = torch.softmax(_logits(data, self.name).double(), dim=1)
        top = probs.topk(min(self.top_m, probs.shape[1]), dim=1).values
        return -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(dim=1).float()
