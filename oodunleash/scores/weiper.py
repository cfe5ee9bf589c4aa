"""WeiPer (Granz, Heurich & Landgraf, NeurIPS 2024): weight perturbations of class projections.

Each class projection ``w_c`` of the linear head is perturbed ``r`` times,
``w_c + delta * ||w_c|| * u_ic`` with ``u_ic`` a seeded random unit vector, which projects a
penultimate feature ``z`` onto ``r * C`` perturbed logits (the "WeiPer space"). The score is the
paper's WeiPer+KLD:

``-(KL_sym(p_train || q_z) + lambda_1 * KL_sym(p'_train || q'_z)) + lambda_2 * MSP_W(z)``

``q_z`` is the histogram of the ``D`` values of one sample's features (``bins`` equal bins over
the ID training range, smoothed by a moving average of ``smoothing`` bins), ``p_train`` the mean
of those histograms over the ID training samples, ``KL_sym(p || q) = KL(p || q) + KL(q || p)``
after adding ``epsilon`` to both and renormalising; the primed terms are the same for the
sample's ``r * C`` perturbed logits; ``MSP_W`` is the maximum softmax probability of each of
the ``r`` perturbed heads, averaged. The fit stores the two training ranges and mean histograms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, positive_option, register_score

__all__ = ["WeiPer", "row_histograms", "smooth", "symmetric_kl", "unit_directions"]

#: Perturbed logits per chunk (float32 logits and their int64 bin indices: about 200 MB).
CHUNK_LOGITS = 1 << 23


def unit_directions(repeats: int, classes: int, dim: int, seed: int) -> Tensor:
    """``(repeats * classes, dim)`` random unit rows, drawn on the CPU from ``seed`` (the same
    on every device); row ``i * classes + c`` perturbs class ``c`` in repeat ``i``.

    Example:
        >>> u = unit_directions(3, 2, 5, seed=0)
        >>> u.shape, bool(torch.allclose(u.norm(dim=1), torch.ones(6)))
        (torch.Size([6, 5]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(repeats * classes, dim, generator=gen), dim=1)


def row_histograms(values: Tensor, low: float, high: float, bins: int) -> Tensor:
    """The fraction of each row's values in each of ``bins`` equal bins over ``[low, high]``:
    ``(rows, bins)`` in float64; values outside the range count in no bin.

    Example:
        >>> row_histograms(torch.tensor([[0.0, 0.5, 1.0, 3.0]]), 0.0, 1.0, 2)
        tensor([[0.2500, 0.5000]], dtype=torch.float64)
    """
    rows, cols = values.shape
    width = max(high - low, 1e-12) / bins
    index = ((values - low) / width).floor_().clamp_(max=bins - 1)
    index = index.masked_fill_(~((values >= low) & (values <= high)), bins).long()
    index += (bins + 1) * torch.arange(rows, device=values.device)[:, None]  # one range a row
    counts = torch.bincount(index.flatten(), minlength=rows * (bins + 1)).view(rows, bins + 1)
    return counts[:, :bins].double() / max(cols, 1)


def smooth(histograms: Tensor, size: int) -> Tensor:
    """Moving average of ``size`` bins along each row, the edges padded by repeating the end
    bins (``(size - 1) // 2`` on the left, the rest on the right).

    Example:
        >>> smooth(torch.tensor([[0.0, 3.0, 0.0, 0.0]]), 3)
        tensor([[1., 1., 1., 0.]])
    """
    if size <= 1:
        return histograms
    left = (size - 1) // 2
    padded = F.pad(histograms[:, None], (left, size - 1 - left), mode="replicate")
    return F.avg_pool1d(padded, size, stride=1)[:, 0]


def symmetric_kl(reference: Tensor, histograms: Tensor, epsilon: float) -> Tensor:
    """``KL(p || q) + KL(q || p) = sum((p - q) * (log p - log q))`` of the reference histogram
    ``p`` and each row ``q``, both after adding ``epsilon`` and renormalising to sum 1.

    Example:
        >>> symmetric_kl(torch.tensor([0.5, 0.5]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]), 0.0)
        tensor([0., inf])
    """
    p = reference + epsilon
    p = p / p.sum()
    q = histograms + epsilon
    q = q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


def _count(option: str, value: float) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value}.")
    return int(value)


@register_score(aliases=["weiper_kld"])
class WeiPer(OODScore):
    """WeiPer+KLD (Granz et al., NeurIPS 2024), see the module docstring for the formula.

    The defaults are the authors' CIFAR-10 / ResNet-18 setting (their OpenOOD config
    ``weiper_kldiv.yml``); for ImageNet / ResNet-50 they report ``delta=2.4, lambda_2=0.25,
    smoothing=40``. The perturbations are fixed by ``seed`` and rebuilt from it (never saved);
    the fitted state is the two training ranges and mean histograms (``2 * bins + 4`` numbers).

    Cost: no extra model pass, no gradients; per sample ``r * C`` extra projections
    (``r`` times the head's matrix product) and two histograms, in chunks of at most
    :data:`CHUNK_LOGITS` perturbed logits; the fit reads the training features twice (ranges,
    then histograms). The ``r * C * D`` unit directions are kept once per device (100 x 1000 x
    2048 floats, 0.8 GB, for ImageNet and a ResNet-50).

    Args:
        repeats: Perturbed copies ``r`` of the head (100).
        delta: Perturbation length relative to each class projection's norm (1.8).
        bins: Histogram bins (100).
        lambda_1: Weight of the WeiPer-space divergence (2.5).
        lambda_2: Weight of ``MSP_W`` (0.1).
        smoothing: Moving-average width ``s_1`` for the feature histogram (4).
        smoothing_perturbed: Width ``s_2`` for the WeiPer-space histogram (15).
        epsilon: Added to the feature histograms before the divergence (0.01).
        epsilon_perturbed: The same for the WeiPer space (0.025).
        seed: Seeds the perturbation directions.
    """

    name = "weiper"
    requires = frozenset({"features", "head"})
    needs_fit = True
    state_keys = ("feature_range", "feature_density", "logit_range", "logit_density")
    grid = ("delta", "d", (1.8, 2.4))

    def __init__(
        self,
        repeats: int = 100,
        delta: float = 1.8,
        bins: int = 100,
        lambda_1: float = 2.5,
        lambda_2: float = 0.1,
        smoothing: int = 4,
        smoothing_perturbed: int = 15,
        epsilon: float = 0.01,
        epsilon_perturbed: float = 0.025,
        seed: int = 0,
    ) -> None:
        self.repeats, self.bins = _count("repeats", repeats), _count("bins", bins)
        self.smoothing = _count("smoothing", smoothing)
        self.smoothing_perturbed = _count("smoothing_perturbed", smoothing_perturbed)
        self.delta = positive_option("delta", delta, allow_zero=True)
        self.lambda_1 = positive_option("lambda_1", lambda_1, allow_zero=True)
        self.lambda_2 = positive_option("lambda_2", lambda_2, allow_zero=True)
        self.epsilon = positive_option("epsilon", epsilon)
        self.epsilon_perturbed = positive_option("epsilon_perturbed", epsilon_perturbed)
        self.seed = int(seed)
        self._directions: dict[tuple[int, int, str], Tensor] = {}

    def __getstate__(self) -> dict:
        # Copies and pickles leave the cached directions behind: the seed rebuilds them.
        return {**self.__dict__, "_directions": {}}

    # ------------------------------------------------------------------ WeiPer space
    def _unit_directions(self, classes: int, dim: int, device: torch.device) -> Tensor:
        key = (classes, dim, str(device))
        if key not in self._directions:  # a pure function of the config: safe to share
            units = unit_directions(self.repeats, classes, dim, self.seed)
            self._directions[key] = units.to(device)
        return self._directions[key]

    def perturbed_logits(self, features: Tensor, data: FeatureSet) -> Tensor:
        """``(n, r * C)`` logits of ``features`` through the ``r`` perturbed heads, column
        ``i * C + c`` for class ``c`` of repeat ``i``: ``w_c.z + b_c + delta ||w_c|| u_ic.z``."""
        head = data.require("head", self.name)
        weight = head.weight.to(features.device, torch.float32)
        bias = head.bias.to(features.device, torch.float32)
        units = self._unit_directions(weight.shape[0], weight.shape[1], features.device)
        base = features @ weight.T + bias  # (n, C)
        lengths = (self.delta * weight.norm(dim=1)).repeat(self.repeats)  # (r * C,)
        return base.repeat(1, self.repeats) + (features @ units.T) * lengths

    def _chunks(self, data: FeatureSet):
        """``(features, perturbed logits)`` of ``data`` in float32 chunks on its device."""
        feats = data.require("features", self.name)
        head = data.require("head", self.name)
        rows = max(1, CHUNK_LOGITS // (self.repeats * head.weight.shape[0]))
        for start in range(0, len(feats), rows):
            chunk = feats[start : start + rows].to(data.compute_device, torch.float32)
            yield chunk, self.perturbed_logits(chunk, data)

    # ------------------------------------------------------------------ fit / score
    def fit(self, data: FeatureSet) -> WeiPer:
        if len(data.require("features", self.name)) == 0:
            raise ValueError("WeiPer needs at least one ID training sample to fit.")
        lows, highs = [], []
        for feats, logits in self._chunks(data):
            lows.append(torch.stack([feats.min(), logits.min()]))
            highs.append(torch.stack([feats.max(), logits.max()]))
        low = torch.stack(lows).min(dim=0).values.double().cpu()
        high = torch.stack(highs).max(dim=0).values.double().cpu()
        feature_sum = torch.zeros(self.bins, dtype=torch.float64)
        logit_sum = torch.zeros(self.bins, dtype=torch.float64)
        for feats, logits in self._chunks(data):
            hist = row_histograms(feats, float(low[0]), float(high[0]), self.bins)
            feature_sum += hist.sum(dim=0).cpu()
            hist = row_histograms(logits, float(low[1]), float(high[1]), self.bins)
            logit_sum += hist.sum(dim=0).cpu()
        n = len(data.features)
        self.feature_range = torch.stack([low[0], high[0]])
        self.logit_range = torch.stack([low[1], high[1]])
        self.feature_density, self.logit_density = feature_sum / n, logit_sum / n
        return self

    def _check_state(self) -> None:
        self.check_fitted()
        for key in ("feature_density", "logit_density"):
            if getattr(self, key).shape != (self.bins,):
                raise ValueError(
                    f"The fitted WeiPer state has {getattr(self, key).shape[0]} bins but the "
                    f"score is configured with bins={self.bins}: fit it again or pass the "
                    "config it was fitted with."
                )

    def score(self, data: FeatureSet) -> Tensor:
        self._check_state()
        out = []
        for feats, logits in self._chunks(data):
            out.append(self._score_chunk(feats, logits))
        if not out:
            return torch.zeros(0, device=data.compute_device)
        return torch.cat(out)

    def _score_chunk(self, feats: Tensor, logits: Tensor) -> Tensor:
        device = feats.device
        f_low, f_high = (float(v) for v in self.feature_range)
        l_low, l_high = (float(v) for v in self.logit_range)
        q_feat = smooth(row_histograms(feats, f_low, f_high, self.bins), self.smoothing)
        q_logit = row_histograms(logits, l_low, l_high, self.bins)
        q_logit = smooth(q_logit, self.smoothing_perturbed)
        p_feat = self.feature_density.to(device, torch.float64)
        p_logit = self.logit_density.to(device, torch.float64)
        divergence = symmetric_kl(p_feat, q_feat, self.epsilon)
        divergence += self.lambda_1 * symmetric_kl(p_logit, q_logit, self.epsilon_perturbed)
        msp = logits.view(len(logits), self.repeats, -1).softmax(dim=2).amax(dim=2).mean(dim=1)
        return (self.lambda_2 * msp.double() - divergence).float()
