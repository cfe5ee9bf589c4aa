"""NNGuide (Park, Jung & Teoh, ICCV 2023): the energy score guided by nearest neighbours.

The bank holds the L2-normalised penultimate features of ID training samples, each scaled by
its own energy (its confidence). A sample's guidance is the mean inner product of its
normalised feature with its ``k`` most similar bank rows; the score is its energy times that
guidance, so a confident sample far from every confident training sample scores low. It reads
the cached logits and features (no extra pass, no gradients); the bank is searched in chunks
like KNN's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, register_score
from oodunleash.scores.distance import CHUNK_ELEMENTS, top_k_similarities
from oodunleash.scores.logits import energy

__all__ = ["NNGuide", "mean_top_k_similarity"]


def mean_top_k_similarity(
    queries: Tensor, bank: Tensor, k: int, *, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """Mean of the ``k`` largest inner products of each query with the rows of ``bank``,
    over query × bank blocks of at most ``chunk_elements`` numbers (on ``bank``'s device).

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8]])
        >>> mean_top_k_similarity(torch.tensor([[1.0, 0.0]]), bank, k=2)
        tensor([0.8000])
    """
    if bank.shape[0] == 0:
        raise ValueError("The NNGuide bank is empty: fit it on ID training data.")
    return top_k_similarities(queries, bank, k, chunk_elements=chunk_elements).mean(dim=1)


@register_score(aliases=["nn_guide"])
class NNGuide(OODScore):
    """Nearest Neighbor Guidance (Park et al., ICCV 2023): ``energy(x) * mean_k <x̂, b_i>``,
    where the bank rows are ``b_i = energy(x_i) * x̂_i`` over ID training samples (``x̂``:
    L2-normalised penultimate features).

    Args:
        k: Neighbours averaged (10, the official code's default).
        sample_fraction: Keep this seeded random fraction of the training samples as the bank
            (the paper's ImageNet bank is 1%; OpenOOD also uses 1% with k = 100 on CIFAR).
            The default keeps all, for the small ID sets this library is often fitted on.
        seed: Seeds the sub-sampling.
    """

    name = "nnguide"
    requires = frozenset({"logits", "features"})
    needs_fit = True
    state_keys = ("bank",)
    grid = ("k", "k", (1, 10, 100))

    def __init__(self, k: int = 10, sample_fraction: float = 1.0, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if not 0 < sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}.")
        self.k = int(k)
        self.sample_fraction = float(sample_fraction)
        self.seed = int(seed)

    def fit(self, data: FeatureSet) -> NNGuide:
        feats = data.require("features", self.name)
        logits = data.require("logits", self.name)
        size = min(len(feats), max(self.k, round(len(feats) * self.sample_fraction)))
        if self.k > size:
            warnings.warn(
                f"NNGuide k={self.k} exceeds the bank of {size} training samples: every "
                f"guidance is then the mean over the whole bank. Choose k <= {size}.",
                stacklevel=2,
            )
        if size < len(feats):
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(feats), generator=gen)[:size].sort().values
            feats, logits = feats[keep.to(feats.device)], logits[keep.to(logits.device)]
        device = data.compute_device
        bank = torch.empty(feats.shape, dtype=torch.float32, device=device)
        rows = max(1, CHUNK_ELEMENTS // max(1, feats.shape[1]))
        for s in range(0, len(feats), rows):
            x = F.normalize(feats[s : s + rows].to(device, torch.float32), dim=1)
            bank[s : s + rows] = x * energy(logits[s : s + rows].to(device))[:, None]
        self.bank = bank
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name)
        logits = data.require("logits", self.name)
        device = data.compute_device
        if self.bank.device != device:
            self.bank = self.bank.to(device)  # move once, then stay with the model
        guidance = mean_top_k_similarity(F.normalize(feats.float(), dim=1), self.bank, self.k)
        return energy(logits).to(guidance.device) * guidance
