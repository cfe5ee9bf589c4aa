"""Principal-subspace scores: ViM and its Residual baseline (Wang et al., CVPR 2022).

The origin is ``u = -pinv(W) b`` (the point the last layer maps to zero logits); the principal
subspace is spanned by the top eigenvectors (``torch.linalg.eigh``, float64) of the ID training
features' second moment about ``u``. The residual is the norm of the projection of ``x - u`` on
the remaining directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oodunleash.features.collect import FeatureSet
from oodunleash.scores.base import OODScore, register_score
from oodunleash.scores.logits import energy

__all__ = ["Residual", "ViM", "default_principal_dim"]


def default_principal_dim(feature_dim: int) -> int:
    """The ViM paper's choice: 1000 for ≥ 2048-d features, 512 for ≥ 768-d, else half."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class _Subspace(OODScore):
    needs_fit = True

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be a positive number of principal directions, got {dim}.")
        self.dim = dim

    def _fit_subspace(self, data: FeatureSet) -> Tensor:
        """Set ``origin`` and ``null_space``; return the training residual norms."""
        feats = data.require("features", self.name)
        head = data.require("head", self.name)
        device = data.compute_device
        weight = head.weight.to(device, torch.float64)
        bias = head.bias.to(device, torch.float64)
        origin = -torch.linalg.pinv(weight) @ bias
        dim = feats.shape[1]
        principal = default_principal_dim(dim) if self.dim is None else self.dim
        if principal >= dim:
            raise ValueError(
                f"{self.name}: dim={principal} leaves no residual space for {dim}-d features; "
                f"choose dim < {dim}."
            )
        moment = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        rows = max(1, (1 << 24) // dim)
        for s in range(0, len(feats), rows):
            x = feats[s : s + rows].to(device, torch.float64) - origin
            moment += x.T @ x
        _, vectors = torch.linalg.eigh(moment / len(feats))  # eigenvalues ascending
        self.origin = origin.float()
        self.null_space = vectors[:, : dim - principal].float().contiguous()
        return self._residual(feats)

    def _residual(self, feats: Tensor) -> Tensor:
        origin = self.origin.to(feats.device)
        null_space = self.null_space.to(feats.device)
        return torch.linalg.vector_norm((feats.float() - origin) @ null_space, dim=1)


@register_score
class ViM(_Subspace):
    """Virtual-logit Matching (Wang et al., CVPR 2022).

    ``energy(logits) - alpha * ||(x - u) P_perp||`` with ``alpha`` = mean max-logit over mean
    residual on the ID training set. ``dim``: principal directions kept (default
    :func:`default_principal_dim`).
    """

    name = "vim"
    requires = frozenset({"logits", "features", "head"})
    state_keys = ("origin", "null_space", "alpha")

    def fit(self, data: FeatureSet) -> ViM:
        residual = self._fit_subspace(data)
        max_logit = data.require("logits", self.name).float().max(dim=1).values
        self.alpha = (max_logit.mean() / residual.mean()).cpu()
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name)
        logits = data.require("logits", self.name)
        return energy(logits) - float(self.alpha) * self._residual(feats)


@register_score
class Residual(_Subspace):
    """Residual baseline of the ViM paper: ``-||(x - u) P_perp||``."""

    name = "residual"
    requires = frozenset({"features", "head"})
    state_keys = ("origin", "null_space")

    def fit(self, data: FeatureSet) -> Residual:
        self._fit_subspace(data)
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        return -self._residual(data.require("features", self.name))
