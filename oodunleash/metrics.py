"""OOD detection metrics (scikit-learn underneath).

Convention (as in the Unleashing Mask paper and the Outlier Exposure code it builds on):
scores are **higher for in-distribution** samples and **ID is the positive class**.

* ``auroc``: area under the ROC curve (the same under either convention).
* ``aupr_in``: average precision with ID as positive.
* ``aupr_out``: average precision with OOD as positive (scores negated).
* ``fpr95``: with ``positive="id"`` (default), the fraction of OOD samples accepted as ID at
  the threshold that keeps 95% of the ID samples. With ``positive="ood"`` the roles swap: the
  fraction of ID samples rejected when 95% of the OOD samples are detected.

Ties are handled as scikit-learn's ``roc_curve`` does: samples with equal scores are accepted
or rejected together, so the operating point never splits a tie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "METRICS",
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "average_metrics",
    "fpr_at_tpr",
    "ood_metrics",
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


def _labels_and_scores(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_arr = _as_array(id_scores, "id_scores")
    ood_arr = _as_array(ood_scores, "ood_scores")
    labels = np.concatenate([np.ones(id_arr.size), np.zeros(ood_arr.size)])
    return labels, np.concatenate([id_arr, ood_arr])


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve; 1.0 when every ID score exceeds every OOD score.

    Example:
        >>> auroc([3.0, 2.0], [1.0, 0.0])
        1.0
    """
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    return float(roc_auc_score(labels, scores))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class.

    Example:
        >>> aupr_in([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    return float(average_precision_score(labels, scores))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (lower score = more OOD).

    Example:
        >>> aupr_out([3.0, 1.0], [2.0, 0.0])
        0.8333333333333333
    """
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    return float(average_precision_score(1 - labels, -scores))


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
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    if positive == "ood":
        labels, scores = 1 - labels, -scores
    elif positive != "id":
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}.")
    fpr, tpr_curve, _ = roc_curve(labels, scores, drop_intermediate=False)
    reached = np.flatnonzero(tpr_curve >= tpr - 1e-12)
    return float(fpr[reached[0]])


def ood_metrics(
    id_scores, ood_scores, *, positive: Positive = "id", tpr: float = 0.95
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``tpr`` (key ``fpr95``) of one ID/OOD pair.

    Example:
        >>> ood_metrics([2.0, 3.0], [0.0, 1.0])
        {'auroc': 1.0, 'aupr_in': 1.0, 'aupr_out': 1.0, 'fpr95': 0.0}
    """
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, tpr, positive),
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
