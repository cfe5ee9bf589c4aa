"""Metrics against scikit-learn and a brute-force FPR, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodunleash.evaluation import metrics
from oodunleash.evaluation.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    average_metrics,
    fpr_at_tpr,
    ood_metrics,
)


def brute_force_fpr(id_scores, ood_scores, tpr=0.95, positive="id"):
    """Try every threshold: accept ``score >= t`` as ID (ties go together)."""
    pos, neg = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    if positive == "ood":
        pos, neg = -neg, -pos
    for t in sorted(set(pos) | set(neg), reverse=True):  # strictest threshold first
        if (pos >= t).mean() >= tpr - 1e-12:
            return (neg >= t).mean()
    return 1.0


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_and_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Integer scores: many ties inside and across the two sets.
    id_scores = rng.integers(0, 12, size=rng.integers(20, 60)) + 3
    ood_scores = rng.integers(0, 12, size=rng.integers(20, 60))
    labels = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    scores = np.r_[id_scores, ood_scores].astype(float)
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(labels, scores))
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(labels, scores))
    assert aupr_out(id_scores, ood_scores) == pytest.approx(
        average_precision_score(1 - labels, -scores)
    )
    for tpr in (0.95, 0.8, 0.5, 1.0):
        for positive in ("id", "ood"):
            assert fpr_at_tpr(id_scores, ood_scores, tpr, positive) == pytest.approx(
                brute_force_fpr(id_scores, ood_scores, tpr, positive)
            )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sizes", [(1, 1), (3, 500), (2000, 1500)])
def test_equal_to_sklearn_on_continuous_and_tied_scores(seed, sizes):
    rng = np.random.default_rng(seed)
    n_id, n_ood = sizes
    for id_scores, ood_scores in (
        (rng.normal(1, 1, n_id), rng.normal(0, 1, n_ood)),  # no ties
        (rng.integers(0, 4, n_id).astype(float), rng.integers(0, 3, n_ood).astype(float)),
    ):
        labels = np.r_[np.ones(n_id), np.zeros(n_ood)]
        scores = np.r_[id_scores, ood_scores]
        got = ood_metrics(id_scores, ood_scores)
        assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert got["aupr_in"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert got["aupr_out"] == pytest.approx(
            average_precision_score(1 - labels, -scores), abs=1e-12
        )
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        assert got["fpr95"] == fpr[np.flatnonzero(tpr >= 0.95 - 1e-12)[0]]
        ours_fpr, ours_tpr = metrics.roc_points(id_scores, ood_scores)
        assert np.allclose(ours_fpr, fpr, atol=1e-15) and np.allclose(ours_tpr, tpr, atol=1e-15)
        swapped = ood_metrics(id_scores, ood_scores, positive="ood")
        assert swapped["fpr95"] == fpr_at_tpr(id_scores, ood_scores, positive="ood")
        assert {k: v for k, v in swapped.items() if k != "fpr95"} == {
            k: v for k, v in got.items() if k != "fpr95"
        }


def test_known_cases():
    # 20 ID scores 1..20: keeping 95% (19) needs threshold 2; OOD at 2 and 3 pass, 1.5 doesn't.
    id_scores = np.arange(1, 21)
    assert fpr_at_tpr(id_scores, [1.5, 2, 3, -5]) == 0.5
    # A tie at the threshold: an OOD sample equal to the 19th ID score is accepted too.
    assert fpr_at_tpr(id_scores, [2.0, 1.0]) == 0.5
    assert ood_metrics([2, 3], [0, 1]) == {
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
        "fpr95": 0.0,
    }
    reversed_ = ood_metrics([0, 1], [2, 3])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0
    tied = ood_metrics([1, 1, 1], [1, 1])
    assert tied["auroc"] == 0.5 and tied["fpr95"] == 1.0
    assert tied["aupr_in"] == pytest.approx(0.6) and tied["aupr_out"] == pytest.approx(0.4)


def test_conventions_differ_only_in_fpr():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    a = ood_metrics(id_scores, ood_scores, positive="id")
    b = ood_metrics(id_scores, ood_scores, positive="ood")
    assert {k: a[k] for k in ("auroc", "aupr_in", "aupr_out")} == {
        k: b[k] for k in ("auroc", "aupr_in", "aupr_out")
    }
    # OOD-positive FPR95: ID rejected when 95% of OOD is detected (score below the threshold).
    threshold = np.sort(ood_scores)[int(np.ceil(0.95 * ood_scores.size)) - 1]  # 190th lowest
    assert b["fpr95"] == pytest.approx((id_scores <= threshold).mean())
    assert a["fpr95"] != b["fpr95"]


def test_aupr_out_is_aupr_in_of_the_flipped_problem():
    rng = np.random.default_rng(1)
    id_scores, ood_scores = rng.normal(1, 1, 50), rng.normal(0, 1, 70)
    assert aupr_out(id_scores, ood_scores) == pytest.approx(aupr_in(-ood_scores, -id_scores))


def test_accepts_tensors():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0


def test_bad_input_errors():
    with pytest.raises(ValueError, match="non-finite"):
        auroc([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="empty"):
        auroc([], [0.0])
    with pytest.raises(ValueError, match="positive"):
        fpr_at_tpr([1.0], [0.0], positive="in")
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=0)


def test_accuracy_and_average():
    assert accuracy(
        torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.0, 1.0]]), torch.tensor([1, 1, 1])
    ) == (pytest.approx(2 / 3))
    assert accuracy(np.array([0, 1, 2]), [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels"):
        accuracy([0, 1], [0])
    avg = average_metrics({"a": {"auroc": 0.8, "fpr95": 0.2}, "b": {"auroc": 0.6, "fpr95": 0.4}})
    assert avg == pytest.approx({"auroc": 0.7, "fpr95": 0.3})
    assert set(metrics.METRICS) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
