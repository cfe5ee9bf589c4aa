"""OOD detection metrics.

Convention (as in the Unleashing Mask paper and the Outlier Exposure code it builds on):
scores are **higher for in-distribution** samples and **ID is the positive class**.

* ``auroc``: area under the ROC curve (the same under either convention).
* ``aupr_in``: average precision with ID as positive.
* ``aupr_out``: average precision with OOD as positive (scores negated).
* ``fpr95``: with ``positive="id"`` (default), the fraction of OOD samples accepted as ID at
  the threshold that keeps 95% of the ID samples. With ``positive="ood"`` the roles swap: the
  fraction of ID samples rejected when 95% of the OOD samples are detected.

The definitions are scikit-learn's (``roc_auc_score``, ``average_precision_score``,
``roc_curve``; the tests hold the two to 1e-12): every metric is read off the true- and
false-positive counts at each distinct score, from one sort of the scores. Ties are handled as
``roc_curve`` does: samples with equal scores are accepted or rejected together, so the
operating point never splits a tie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np

__all__ = [
    "METRICS",
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "average_metrics",
    "fpr_at_tpr",
    "ood_metrics",
    "roc_points",
]

Positive = Literal["id", "ood"]

#: Metric names returned by :func:`ood_metrics`, and whether higher is better.
METRICS: dict[str, bool] = {"auroc": True, "aupr_in": True, "aupr_out": True, "fpr95": False}


def _as_array(values, what: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty: every data set needs at least one sample.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"{what} contains {bad} non-finite value(s) (NaN/inf); check the model's outputs "
            "and the score's settings (e.g. a temperature of 0)."
        )
    return arr


def _counts(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives accepted at each distinct score, from the highest down (a
    threshold accepts every sample scoring at or above it)."""
    scores = np.concatenate([positive, negative])
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    is_positive = order < positive.size
    # The last position of each run of equal scores: a threshold takes a tie whole.
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(is_positive)[ends]
    return true_pos, ends + 1 - true_pos


def _check_positive(positive: str) -> Positive:
    if positive not in ("id", "ood"):
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}.")
    return positive  # type: ignore[return-value]


def _orient(
    id_arr: np.ndarray, ood_arr: np.ndarray, positive: Positive
) -> tuple[np.ndarray, np.ndarray]:
    """``(positive scores, negative scores)``, higher meaning more positive."""
    return (id_arr, ood_arr) if _check_positive(positive) == "id" else (-ood_arr, -id_arr)


def _oriented(id_scores, ood_scores, positive: Positive) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_orient` of the scores checked and made arrays."""
    id_arr = _as_array(id_scores, "id_scores")
    return _orient(id_arr, _as_array(ood_scores, "ood_scores"), positive)


def roc_points(id_scores, ood_scores, positive: Positive = "id") -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr)``, one point per distinct score and a first point at (0, 0):
    the fraction of negatives and of positives accepted at each threshold.

    Example:
        >>> fpr, tpr = roc_points([3.0, 2.0], [2.0, 0.0])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    return _curve(*_counts(*_oriented(id_scores, ood_scores, positive)))


def _curve(true_pos: np.ndarray, false_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The last threshold accepts everything: the counts end at the totals.
    return np.r_[0.0, false_pos / false_pos[-1]], np.r_[0.0, true_pos / true_pos[-1]]


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def _average_precision(true_pos: np.ndarray, false_pos: np.ndarray) -> float:
    # The sum over thresholds of (recall gained) x (precision there).
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(np.diff(np.r_[0, true_pos]) * precision) / true_pos[-1])


def _fpr_at(fpr: np.ndarray, tpr_curve: np.ndarray, tpr: float) -> float:
    return float(fpr[np.flatnonzero(tpr_curve >= tpr - 1e-12)[0]])


def _check_tpr(tpr: float) -> None:
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve; 1.0 when every ID score exceeds every OOD score.

    Example:
        >>> auroc([3.0, 2.0], [1.0, 0.0])
        1.0
    """
    return _area(*roc_points(id_scores, ood_scores))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class.

    Example:
        >>> aupr_in([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    return _average_precision(*_counts(*_oriented(id_scores, ood_scores, "id")))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (lower score = more OOD).

    Example:
        >>> aupr_out([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    return _average_precision(*_counts(*_oriented(id_scores, ood_scores, "ood")))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, positive: Positive = "id") -> float:
    """False-positive rate at the first threshold reaching true-positive rate ``tpr``.

    With ``positive="id"``: the fraction of OOD samples scoring at or above the highest
    threshold that keeps at least ``tpr`` of the ID samples. With ``positive="ood"``: the
    fraction of ID samples scoring at or below the lowest threshold that flags at least ``tpr``
    of the OOD samples.

    Example:
        >>> fpr_at_tpr([5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
        ...            [0.5, 100])
        0.5
    """
    _check_tpr(tpr)
    return _fpr_at(*roc_points(id_scores, ood_scores, positive), tpr)


def ood_metrics(
    id_scores, ood_scores, *, positive: Positive = "id", tpr: float = 0.95
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``tpr`` (key ``fpr95``) of one ID/OOD pair.

    Example:
        >>> ood_metrics([2.0, 3.0], [0.0, 1.0])
        {'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0, 'fpr95': 0.0}
    """
    _check_tpr(tpr)
    _check_positive(positive)
    id_arr, ood_arr = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    counts = {side: _counts(*_orient(id_arr, ood_arr, side)) for side in ("id", "ood")}
    return {
        "auroc": _area(*_curve(*counts["id"])),
        "aupr_in": _average_precision(*counts["id"]),
        "aupr_out": _average_precision(*counts["ood"]),
        "fpr95": _fpr_at(*_curve(*counts[positive]), tpr),
    }


def average_metrics(per_set: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]]):
    """Mean of each metric over OOD sets.

    Example:
        >>> average_metrics({"a": {"auroc": 0.8}, "b": {"auroc": 0.6}})
        {'auroc': 0.7}
    """
    rows = list(per_set.values()) if isinstance(per_set, Mapping) else list(per_set)
    if not rows:
        raise ValueError("average_metrics needs at least one OOD set.")
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def accuracy(logits_or_predictions, labels) -> float:
    """Top-1 accuracy from ``(n, classes)`` logits or ``(n,)`` predicted classes.

    Example:
        >>> accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1])
        0.5
    """
    out = logits_or_predictions
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    out = np.asarray(out)
    labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    predictions = out.argmax(axis=1) if out.ndim == 2 else out
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{predictions.shape[0]} predictions but {labels.shape[0]} labels; they must match."
        )
    return float((predictions == labels).mean())
