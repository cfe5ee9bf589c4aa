"""Feature-space scores: distances and similarities to the ID training features.

Mahalanobis, Relative Mahalanobis, KNN and SHE. Banks and statistics are processed in chunks
(``chunk_elements`` numbers at a time) on the model's device, so a 1,000,000 × 512 bank needs
the bank itself plus a few hundred MB of work space.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from oodunleash.features.collect import FeatureSet
from oodunleash.scores.base import OODScore, register_score

__all__ = [
    "KNN",
    "SHE",
    "Mahalanobis",
    "RelativeMahalanobis",
    "kth_neighbour_similarity",
    "ledoit_wolf_shrinkage",
    "top_k_similarities",
]

#: Numbers per work chunk (~128 MB in float32).
CHUNK_ELEMENTS = 1 << 25


def _rows(cols: int, budget: int = CHUNK_ELEMENTS) -> int:
    return max(1, budget // max(1, cols))


def _chunks(n: int, size: int):
    if n == 0:  # one empty chunk: an empty batch gets empty scores
        yield 0, 0
        return
    for start in range(0, n, size):
        yield start, min(n, start + size)


def kth_neighbour_similarity(
    queries: Tensor, bank: Tensor, k: int, *, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """The ``k``-th largest inner product of each query with the rows of ``bank``.

    Runs on ``bank``'s device with torch matmul + top-k over query × bank blocks of at most
    ``chunk_elements`` numbers, merging running top-k lists, so memory stays bounded whatever
    the bank size.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> kth_neighbour_similarity(torch.tensor([[1.0, 0.0]]), bank, k=2)
        tensor([0.6000])
    """
    if bank.shape[0] == 0:
        raise ValueError("The feature bank is empty.")
    if queries.shape[0] == 0:  # an empty batch has empty scores
        return queries.new_zeros(0, dtype=torch.float32)
    return top_k_similarities(queries, bank, k, chunk_elements=chunk_elements)[:, -1]


def top_k_similarities(
    queries: Tensor, bank: Tensor, k: int, *, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """The ``min(k, len(bank))`` largest inner products of each query with the rows of a
    non-empty ``bank``, in descending order: ``(len(queries), k)``, on ``queries``' device.

    Computed on ``bank``'s device over query × bank blocks of at most ``chunk_elements``
    numbers, merging running top-k lists, so memory stays bounded whatever the bank size.
    """
    k = min(k, bank.shape[0])
    if queries.shape[0] == 0:
        return queries.new_zeros(0, k, dtype=torch.float32)
    q_rows = min(queries.shape[0], max(1, int(math.isqrt(chunk_elements))))
    b_rows = max(k, _rows(q_rows, chunk_elements))
    out = []
    for qs, qe in _chunks(queries.shape[0], q_rows):
        q = queries[qs:qe].to(bank.device, torch.float32)
        best = None
        for bs, be in _chunks(bank.shape[0], b_rows):
            sims = q @ bank[bs:be].to(torch.float32).T
            top = sims.topk(min(k, be - bs), dim=1).values
            best = top if best is None else torch.cat([best, top], dim=1).topk(k, dim=1).values
        out.append(best)
    return torch.cat(out).to(queries.device)


# --------------------------------------------------------------------------- Mahalanobis
def _class_statistics(
    features: Tensor, labels: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Means of the classes present (float64), the shared covariance of the class-centred
    features, ``sum (x - mu_y)(x - mu_y)^T / n``, and ``sum ||x - mu_y||^4`` (for
    :func:`ledoit_wolf_shrinkage`)."""
    classes, y_all = torch.unique(labels.long(), return_inverse=True)
    dim = features.shape[1]
    sums = torch.zeros(len(classes), dim, dtype=torch.float64, device=device)
    counts = torch.zeros(len(classes), dtype=torch.float64, device=device)
    rows = _rows(dim)
    for s, e in _chunks(len(features), rows):
        x = features[s:e].to(device, torch.float64)
        y = y_all[s:e].to(device)
        sums.index_add_(0, y, x)
        counts += torch.bincount(y, minlength=len(classes)).double()
    means = sums / counts[:, None]
    cov = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    fourth = torch.zeros((), dtype=torch.float64, device=device)
    for s, e in _chunks(len(features), rows):
        centred = features[s:e].to(device, torch.float64) - means[y_all[s:e].to(device)]
        cov += centred.T @ centred
        fourth += (centred * centred).sum(dim=1).square().sum()
    return means, cov / len(features), fourth


def _global_statistics(features: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    dim = features.shape[1]
    rows = _rows(dim)
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    for s, e in _chunks(len(features), rows):
        total += features[s:e].to(device, torch.float64).sum(dim=0)
    mean = total / len(features)
    cov = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    fourth = torch.zeros((), dtype=torch.float64, device=device)
    for s, e in _chunks(len(features), rows):
        centred = features[s:e].to(device, torch.float64) - mean
        cov += centred.T @ centred
        fourth += (centred * centred).sum(dim=1).square().sum()
    return mean, cov / len(features), fourth


def ledoit_wolf_shrinkage(cov: Tensor, fourth: Tensor | float, n: int) -> float:
    """The Ledoit–Wolf (2004) shrinkage of the covariance ``cov`` of ``n`` centred samples
    towards ``trace(cov) / dim * I``, from ``fourth = sum_k ||x_k||^4``; the value of
    scikit-learn's ``LedoitWolf(assume_centered=True)``, computed without the data matrix.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [0.0, -0.1]], dtype=torch.float64)
        >>> round(ledoit_wolf_shrinkage(x.T @ x / 4, (x * x).sum(1).square().sum(), 4), 4)
        0.5102
    """
    dim = cov.shape[0]
    mu = float(torch.trace(cov)) / dim
    delta_sum = float((cov * cov).sum())  # ||S||_F^2
    beta = (float(fourth) / n - delta_sum) / (dim * n)
    delta = (delta_sum - 2 * mu * float(torch.trace(cov)) + dim * mu * mu) / dim
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else beta / delta


#: How :class:`Mahalanobis` turns the covariance into a precision matrix.
COVARIANCES = ("auto", "empirical", "ledoit_wolf")


def _precision(cov: Tensor, fourth: Tensor, n: int, rule: str) -> Tensor:
    """The precision matrix of ``cov``: a pseudo-inverse of the empirical covariance, or the
    inverse of its Ledoit–Wolf shrinkage (``"auto"``: shrink when ``n <= dim``, where the
    empirical covariance is singular)."""
    shrink = rule == "ledoit_wolf" or (rule == "auto" and n <= cov.shape[0])
    if not shrink:
        return torch.linalg.pinv(cov, hermitian=True)
    alpha = ledoit_wolf_shrinkage(cov, fourth, n)
    target = torch.trace(cov) / cov.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.pinv((1 - alpha) * cov + alpha * target * eye, hermitian=True)


def _squared_mahalanobis(x: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """``(x - mu_c)^T P (x - mu_c)`` for every row of ``x`` and every mean (float64)."""
    xp = x @ precision
    mpm = ((means @ precision) * means).sum(dim=1)
    return (xp * x).sum(dim=1, keepdim=True) - 2 * xp @ means.T + mpm


class _MahalanobisBase(OODScore):
    requires = frozenset({"features", "labels"})
    needs_fit = True

    def __init__(self, covariance: str = "auto") -> None:
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}.")
        self.covariance = covariance

    def _device(self, data: FeatureSet) -> torch.device:
        return data.compute_device

    def _min_class_distance(self, features: Tensor, device: torch.device) -> Tensor:
        means = self.means.to(device, torch.float64)
        precision = self.precision.to(device, torch.float64)
        out = []
        for s, e in _chunks(len(features), _rows(max(features.shape[1], means.shape[0]))):
            x = features[s:e].to(device, torch.float64)
            out.append(_squared_mahalanobis(x, means, precision).min(dim=1).values)
        return torch.cat(out)

    def _fit_classes(self, data: FeatureSet) -> None:
        feats = data.require("features", self.name)
        labels = data.require("labels", self.name)
        means, cov, fourth = _class_statistics(feats, labels, self._device(data))
        self.means = means
        self.precision = _precision(cov, fourth, len(feats), self.covariance)


@register_score(aliases=["mds"])
class Mahalanobis(_MahalanobisBase):
    """Mahalanobis distance to the closest class mean (Lee et al., NeurIPS 2018).

    Class means and one covariance shared by all classes (of the class-centred penultimate
    features), in float64, inverted with a pseudo-inverse. Score ``-min_c d_c(x)``.

    ``covariance``: ``"empirical"`` (the sample covariance), ``"ledoit_wolf"`` (shrunk towards
    a multiple of the identity by the Ledoit–Wolf rule) or ``"auto"`` (the default: Ledoit–Wolf
    when there are no more training samples than feature dimensions, where the sample
    covariance is singular and its pseudo-inverse ignores every direction the ID data did not
    span; the empirical covariance otherwise).

    Deviation from the paper: penultimate layer only, no input pre-processing and no ensemble of
    layers with a logistic regressor (the common "MDS" baseline of OpenOOD and later papers).
    """

    name = "mahalanobis"
    state_keys = ("means", "precision")

    def fit(self, data: FeatureSet) -> Mahalanobis:
        self._fit_classes(data)
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name)
        return (-self._min_class_distance(feats, self._device(data))).float().to(feats.device)


@register_score(aliases=["rmd", "rmds", "relative_mahalanobis_distance"])
class RelativeMahalanobis(_MahalanobisBase):
    """Relative Mahalanobis distance (Ren et al., 2021).

    ``RMD_c(x) = MD_c(x) - MD_0(x)``, where ``MD_0`` uses the mean and covariance of all
    training features ignoring classes. Score ``-min_c RMD_c(x)``. ``covariance``: as for
    :class:`Mahalanobis`, for both covariances.
    """

    name = "relative_mahalanobis"
    state_keys = ("means", "precision", "background_mean", "background_precision")

    def fit(self, data: FeatureSet) -> RelativeMahalanobis:
        self._fit_classes(data)
        feats = data.require("features", self.name)
        mean, cov, fourth = _global_statistics(feats, self._device(data))
        self.background_mean = mean
        self.background_precision = _precision(cov, fourth, len(feats), self.covariance)
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name)
        device = self._device(data)
        class_d = self._min_class_distance(feats, device)
        mean = self.background_mean.to(device, torch.float64)[None]
        precision = self.background_precision.to(device, torch.float64)
        back = []
        for s, e in _chunks(len(feats), _rows(feats.shape[1])):
            x = feats[s:e].to(device, torch.float64)
            back.append(_squared_mahalanobis(x, mean, precision)[:, 0])
        return (-(class_d - torch.cat(back))).float().to(feats.device)


# --------------------------------------------------------------------------- KNN
@register_score(aliases=["deep_knn"])
class KNN(OODScore):
    """Deep nearest neighbours (Sun et al., ICML 2022).

    Features are L2-normalised; the score is minus the Euclidean distance to the ``k``-th
    nearest normalised ID training feature (k = 50, the paper's CIFAR setting).

    Args:
        k: Which neighbour.
        sample_fraction: Keep this random fraction of the training features as the bank (the
            paper uses 1% with k = 1000 on ImageNet).
        bank_dtype: ``"float32"`` or ``"float16"`` (half the memory; distances then carry
            ~1e-3 relative rounding).
        max_saved: :meth:`state_dict` saves at most this many bank rows (a seeded random
            subset), so Hub checkpoints stay small; ``None`` saves the whole bank.
        save_dtype: Precision of the saved bank.
        seed: Seeds the sub-sampling.

    A bank restored from a subset of fraction ``f`` of the original bank uses the neighbour
    ``max(1, round(k * f))``: the ``k*f``-th neighbour in an ``f``-subsample estimates the
    ``k``-th neighbour in the full bank, so scores stay on the same scale.
    """

    name = "knn"
    requires = frozenset({"features"})
    needs_fit = True
    state_keys = ("bank", "k_scale")
    grid = ("k", "k", (1, 10, 50))

    def __init__(
        self,
        k: int = 50,
        sample_fraction: float = 1.0,
        bank_dtype: str = "float32",
        max_saved: int | None = 50_000,
        save_dtype: str = "float16",
        seed: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if not 0 < sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}.")
        for option, value in (("bank_dtype", bank_dtype), ("save_dtype", save_dtype)):
            if value not in ("float32", "float16"):
                raise ValueError(f"{option} must be 'float32' or 'float16', got {value!r}.")
        self.k = int(k)
        self.sample_fraction = float(sample_fraction)
        self.bank_dtype = bank_dtype
        self.max_saved = max_saved
        self.save_dtype = save_dtype
        self.seed = seed

    def _subset(self, n: int, size: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=gen)[:size].sort().values

    def fit(self, data: FeatureSet) -> KNN:
        feats = data.require("features", self.name)
        bank_size = min(len(feats), max(self.k, round(len(feats) * self.sample_fraction)))
        if self.k > bank_size:
            warnings.warn(
                f"KNN k={self.k} exceeds the bank of {bank_size} training features: every score "
                "is then the distance to the farthest training feature, which ranks OOD data "
                f"badly. Choose k <= {bank_size}, or fit on more data.",
                stacklevel=2,
            )
        if self.sample_fraction < 1:
            size = max(self.k, round(len(feats) * self.sample_fraction))
            feats = feats[self._subset(len(feats), size)]
        device = data.compute_device
        bank = torch.empty(feats.shape, dtype=getattr(torch, self.bank_dtype), device=device)
        for s, e in _chunks(len(feats), _rows(feats.shape[1])):
            bank[s:e] = F.normalize(feats[s:e].to(device, torch.float32), dim=1)
        self.bank = bank
        self.k_scale = torch.tensor(1.0)
        return self

    @property
    def effective_k(self) -> int:
        """The neighbour actually used: ``max(1, round(k * f))``, where ``f`` is the fraction of
        the fitted bank that was kept when it was saved and restored (1 after :meth:`fit`)."""
        return max(1, round(self.k * float(self.k_scale)))

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        feats = data.require("features", self.name)
        device = data.compute_device
        if self.bank.device != device:
            self.bank = self.bank.to(device)  # move once, then stay with the model
        queries = F.normalize(feats.float(), dim=1)
        sims = kth_neighbour_similarity(queries, self.bank, self.effective_k)
        return -torch.sqrt(torch.clamp(2 - 2 * sims, min=0))

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if "bank" in state:
            bank = state["bank"]
            if self.max_saved is not None and len(bank) > self.max_saved:
                bank = bank[self._subset(len(bank), self.max_saved)]
                state["k_scale"] = state["k_scale"] * len(bank) / len(state["bank"])
            state["bank"] = bank.to(getattr(torch, self.save_dtype)).contiguous()
        return state


# --------------------------------------------------------------------------- SHE
@register_score(aliases=["simplified_hopfield_energy"])
class SHE(OODScore):
    """Simplified Hopfield Energy (Zhang et al., ICLR 2023).

    Stored patterns: for each class, the mean penultimate feature of the training samples of
    that class the model classifies correctly. Score: inner product of a sample's feature with
    the pattern of its predicted class.
    """

    name = "she"
    requires = frozenset({"logits", "features", "labels"})
    needs_fit = True
    state_keys = ("patterns",)

    def fit(self, data: FeatureSet) -> SHE:
        logits = data.require("logits", self.name)
        feats = data.require("features", self.name).float()
        labels = data.require("labels", self.name).long()
        correct = logits.argmax(dim=1) == labels
        num_classes = logits.shape[1]
        sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels[correct].cpu(), feats[correct].double().cpu())
        counts = torch.bincount(labels[correct].cpu(), minlength=num_classes).clamp(min=1)
        self.patterns = (sums / counts[:, None]).float()
        return self

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        logits = data.require("logits", self.name)
        feats = data.require("features", self.name).float()
        patterns = self.patterns.to(feats.device)
        return (feats * patterns[logits.argmax(dim=1)]).sum(dim=1)
