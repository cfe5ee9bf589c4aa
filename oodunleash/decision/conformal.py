"""Conformal p-values and the decisions they allow (Vovk et al. 2005; Bates et al. 2023,
"Testing for outliers with conformal p-values").

Scores follow the library's convention, **higher = more in-distribution**. With ``n``
calibration scores from held-out ID images, the p-value of a test score ``s`` is

    p(s) = (1 + #{calibration scores <= s}) / (n + 1).

If the test image and the calibration images are exchangeable (drawn the same way from the
ID distribution), ``P(p <= alpha) <= alpha``: flagging ``p <= alpha`` as OOD wrongly flags at
most a share ``alpha`` of ID images, on average over calibration sets and test images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "benjamini_hochberg",
    "check_alpha",
    "conformal_p_values",
    "conformal_threshold",
    "min_calibration_size",
]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, after refusing a value outside (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}.")
    return float(alpha)


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration scores with which a p-value can reach ``alpha``: the smallest
    p-value is ``1 / (n + 1)``, so ``n >= 1 / alpha - 1``.

    Example:
        >>> min_calibration_size(0.05), min_calibration_size(0.01), min_calibration_size(0.3)
        (19, 99, 3)
    """
    alpha = check_alpha(alpha)
    # A little slack below 1 / alpha - 1 so that 1 / 0.05 - 1 = 19.000000000000004 gives 19.
    return max(math.ceil(1 / alpha - 1 - 1e-9), 0)


def conformal_p_values(calibration: Tensor, scores: Tensor) -> Tensor:
    """Conformal p-value of each of ``scores`` against the ``calibration`` scores (both 1-D,
    higher = more ID): ``(1 + #{calibration <= s}) / (n + 1)``, as float64 on the CPU.

    Example:
        >>> conformal_p_values(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 9.0]))
        tensor([0.2500, 0.7500, 1.0000], dtype=torch.float64)
    """
    cal = _flat(calibration, "calibration").sort().values
    test = _flat(scores, "scores")
    if cal.numel() == 0:
        raise ValueError("No calibration scores: calibrate on at least one ID image.")
    if torch.isnan(cal).any() or torch.isnan(test).any():
        raise ValueError("Scores contain NaN: a p-value needs finite (or infinite) scores.")
    below_or_equal = torch.searchsorted(cal, test, right=True)  # #{cal <= s}
    return (1.0 + below_or_equal.double()) / (cal.numel() + 1.0)


def conformal_threshold(calibration: Tensor, alpha: float) -> float:
    """The score below which ``p <= alpha``: the ``k``-th smallest calibration score with
    ``k = floor(alpha * (n + 1))``; a score ``s`` is flagged exactly when ``s < threshold``.
    ``-inf`` (nothing can be flagged) when ``k = 0``.

    Example:
        >>> conformal_threshold(torch.arange(1.0, 20.0), 0.1)  # n = 19, k = 2
        2.0
    """
    alpha = check_alpha(alpha)
    cal = _flat(calibration, "calibration").sort().values
    k = math.floor(alpha * (cal.numel() + 1) + 1e-9)
    return -math.inf if k == 0 else float(cal[min(k, cal.numel()) - 1])


def benjamini_hochberg(p_values: Tensor, alpha: float) -> Tensor:
    """Which hypotheses Benjamini-Hochberg rejects at false-discovery rate ``alpha``: the ``k``
    smallest p-values, for the largest ``k`` with ``p_(k) <= k * alpha / m``. A boolean tensor
    in the order of ``p_values``.

    Example:
        >>> benjamini_hochberg(torch.tensor([0.01, 0.04, 0.02, 0.5]), 0.05).tolist()
        [True, False, True, False]
    """
    alpha = check_alpha(alpha)
    p = _flat(p_values, "p_values").double()
    m = p.numel()
    rejected = torch.zeros(m, dtype=torch.bool)
    if m == 0:
        return rejected
    order = p.argsort(stable=True)
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    passing = (p[order] <= ranks * alpha / m).nonzero()
    if passing.numel():
        k = int(passing.max()) + 1
        rejected[order[:k]] = True
    return rejected


def _flat(values: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor):
        values = torch.as_tensor(values)
    if values.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one value per image), got shape {tuple(values.shape)}."
        )
    return values.detach().to("cpu", torch.float64)
