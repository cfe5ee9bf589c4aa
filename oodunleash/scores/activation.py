"""Activation-shaping scores: ReAct, ASH-P/B/S and DICE, each followed by the energy score.

They modify the penultimate features, the pre-pool feature maps or the last layer, recompute
the logits and read out the energy ``logsumexp(logits)``. They were designed for networks with
ReLU (non-negative) activations.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from oodunleash.features.collect import FeatureSet
from oodunleash.scores.base import OODScore, register_score
from oodunleash.scores.logits import energy

__all__ = ["ASHB", "ASHP", "ASHS", "DICE", "ReAct", "ash_b", "ash_p", "ash_s", "percentile"]

#: Percentiles are exact up to this many values, estimated from a seeded sample above.
MAX_PERCENTILE_ELEMENTS = 1 << 24


def percentile(values: Tensor, q: float, *, seed: int = 0) -> float:
    """``numpy.percentile`` (linear interpolation) of all entries of ``values``.

    Above :data:`MAX_PERCENTILE_ELEMENTS` entries it is estimated from a seeded random sample
    of that many entries (a ±0.03% rank error at that size), so a million-sample bank fits.

    Example:
        >>> percentile(torch.arange(11.0), 90)
        9.0
    """
    flat = values.detach().reshape(-1)
    if flat.numel() > MAX_PERCENTILE_ELEMENTS:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(flat.numel(), (MAX_PERCENTILE_ELEMENTS,), generator=gen)
        flat = flat[pick.to(flat.device)]
    return float(np.percentile(flat.float().cpu().numpy(), q))


def _check_percentile(value: float, option: str) -> float:
    if not 0 <= value < 100:
        raise ValueError(f"{option} must be in [0, 100), got {value}.")
    return float(value)


@register_score
class ReAct(OODScore):
    """ReAct (Sun, Guo & Li, NeurIPS 2021): clip the penultimate features at the
    ``percentile``-th percentile (90) of the ID training activations, then the energy score."""

    name = "react"
    requires = frozenset({"features", "head"})
    needs_fit = True
    state_keys = ("threshold",)
    grid = ("percentile", "p", (85.0, 90.0, 95.0))

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = _check_percentile(percentile, "percentile")

    def fit(self, data: FeatureSet) -> ReAct:
        feats = data.require("features", self.name)
        self.threshold = torch.tensor(percentile(feats, self.percentile))
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name).float()
        clipped = feats.clamp(max=float(self.threshold))
        return energy(data.logits_from_features(clipped))


# --------------------------------------------------------------------------- ASH
def _top_k(maps: Tensor, pruning: float) -> tuple[Tensor, Tensor, Tensor, int]:
    flat = maps.float().flatten(1)
    n = flat.shape[1]
    k = max(1, n - int(np.round(n * pruning / 100.0)))
    values, index = flat.topk(k, dim=1)
    return flat, values, index, k


def ash_p(maps: Tensor, pruning: float) -> Tensor:
    """ASH-P: per sample, zero all but the top ``100 - pruning`` % activations.

    Example:
        >>> ash_p(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 50)
        tensor([[0., 4., 0., 3.]])
    """
    flat, values, index, _ = _top_k(maps, pruning)
    return torch.zeros_like(flat).scatter_(1, index, values).view(maps.shape)


def ash_b(maps: Tensor, pruning: float) -> Tensor:
    """ASH-B: prune as ASH-P, then set every kept activation to ``sum(all) / kept``.

    Example:
        >>> ash_b(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 50)
        tensor([[0., 5., 0., 5.]])
    """
    flat, values, index, k = _top_k(maps, pruning)
    fill = (flat.sum(dim=1, keepdim=True) / k).expand_as(values)
    return torch.zeros_like(flat).scatter_(1, index, fill).view(maps.shape)


def ash_s(maps: Tensor, pruning: float) -> Tensor:
    """ASH-S: prune as ASH-P, then scale by ``exp(sum(all) / sum(kept))``.

    Example:
        >>> ash_s(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), 50)  # e^(10/7) scale
        tensor([[ 0.0000, 16.6909,  0.0000, 12.5182]])
    """
    pruned = ash_p(maps, pruning)
    ratio = maps.float().flatten(1).sum(dim=1) / pruned.flatten(1).sum(dim=1)
    return pruned * torch.exp(ratio).view(-1, *([1] * (maps.dim() - 1)))


class _ASH(OODScore):
    requires = frozenset({"feature_maps"})
    _shape = staticmethod(ash_p)

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = _check_percentile(percentile, "percentile")

    def score(self, data: FeatureSet) -> Tensor:
        maps = data.require("feature_maps", self.name)
        return energy(data.logits_from_maps(type(self)._shape(maps, self.percentile)))


@register_score(aliases=["ashp"])
class ASHP(_ASH):
    """ASH-P (Djurisic et al., ICLR 2023) on the pre-pool feature maps, then energy.
    Pruning percentile 60 (the paper's ImageNet/ResNet-50 setting)."""

    name = "ash_p"
    _shape = staticmethod(ash_p)

    def __init__(self, percentile: float = 60.0) -> None:
        super().__init__(percentile)


@register_score(aliases=["ashb"])
class ASHB(_ASH):
    """ASH-B (Djurisic et al., ICLR 2023): binarised pruned maps, then energy. Pruning
    percentile 65 (the paper's ImageNet/ResNet-50 setting)."""

    name = "ash_b"
    _shape = staticmethod(ash_b)

    def __init__(self, percentile: float = 65.0) -> None:
        super().__init__(percentile)


@register_score(aliases=["ashs", "ash"])
class ASHS(_ASH):
    """ASH-S (Djurisic et al., ICLR 2023): pruned and exponentially re-scaled maps, then energy.
    Pruning percentile 90 (the paper's ImageNet/ResNet-50 setting)."""

    name = "ash_s"
    _shape = staticmethod(ash_s)


# --------------------------------------------------------------------------- DICE
@register_score
class DICE(OODScore):
    """DICE (Sun & Li, ECCV 2022): sparsify the last layer by contribution, then energy.

    The contribution of weight ``w_cj`` is ``mean_ID(h_j) * w_cj``; the ``sparsity`` fraction
    (0.9) of weights with the smallest contributions (the ``100 * sparsity``-th percentile of
    the whole matrix) is dropped.
    """

    name = "dice"
    requires = frozenset({"features", "head"})
    needs_fit = True
    state_keys = ("mask",)
    grid = ("sparsity", "s", (0.5, 0.7, 0.9))

    def __init__(self, sparsity: float = 0.9) -> None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
        self.sparsity = float(sparsity)

    def fit(self, data: FeatureSet) -> DICE:
        feats = data.require("features", self.name)
        head = data.require("head", self.name)
        mean = feats.double().mean(dim=0).to(head.weight.device)
        contribution = mean[None, :] * head.weight.double()
        threshold = percentile(contribution, 100 * self.sparsity)
        self.mask = (contribution > threshold).cpu()
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name).float()
        head = data.require("head", self.name)
        if self.mask.shape != head.weight.shape:
            raise ValueError(
                f"The DICE mask {tuple(self.mask.shape)} does not fit this head "
                f"{tuple(head.weight.shape)}: fit it again with fit_scores."
            )
        weight = head.weight.to(feats.device, torch.float32) * self.mask.to(feats.device)
        return energy(feats @ weight.T + head.bias.to(feats.device, torch.float32))
