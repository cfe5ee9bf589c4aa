"""Conformal p-values, thresholds and Benjamini-Hochberg (oodunleash.decision.conformal), and
calibrate / predict on the wrapper: the math against brute force, the false-alarm guarantee on
exchangeable data, the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodunleash import OODUnleash
from oodunleash.decision import (
    Calibration,
    NotCalibratedError,
    benjamini_hochberg,
    conformal_p_values,
    conformal_threshold,
    min_calibration_size,
)


def brute_p(calibration: list[float], s: float) -> float:
    return (1 + sum(c <= s for c in calibration)) / (len(calibration) + 1)


def brute_bh(p: list[float], alpha: float) -> list[bool]:
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    k = max((r + 1 for r in range(m) if p[ranked[r]] <= (r + 1) * alpha / m), default=0)
    rejected = set(ranked[:k])
    return [i in rejected for i in range(m)]


def test_p_values_match_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 10, (37,), generator=g).float()  # many ties
    scores = torch.cat([torch.randint(-2, 12, (50,), generator=g).float(), calibration[:5]])
    got = conformal_p_values(calibration, scores)
    expected = [brute_p(calibration.tolist(), s) for s in scores.tolist()]
    assert got.tolist() == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.25])
def test_threshold_flags_exactly_the_p_values_at_or_below_alpha(alpha):
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(150, generator=g)
    scores = torch.cat([torch.randn(400, generator=g), calibration])  # ties at the threshold
    flagged = conformal_p_values(calibration, scores) <= alpha
    threshold = conformal_threshold(calibration, alpha)
    assert torch.equal(flagged, scores.double() < threshold)


def test_min_calibration_size_is_where_the_smallest_p_value_reaches_alpha():
    for alpha in (0.5, 0.3, 0.1, 0.05, 0.02, 0.01, 0.001):
        n = min_calibration_size(alpha)
        assert 1 / (n + 1) <= alpha < (1 / n if n else math.inf)


def test_benjamini_hochberg_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        m = 1 + trial * 3
        p = torch.cat([torch.rand(m, generator=g), torch.rand(m, generator=g) * 0.01])
        for alpha in (0.05, 0.2):
            assert benjamini_hochberg(p, alpha).tolist() == brute_bh(p.tolist(), alpha)


def test_benjamini_hochberg_rejects_more_than_bonferroni_less_than_per_image():
    p = torch.tensor([0.001, 0.008, 0.012, 0.02, 0.03, 0.2, 0.5, 0.9])
    rejected = benjamini_hochberg(p, 0.05)
    assert rejected.tolist() == [True] * 5 + [False] * 3  # 0.03 <= 5 * 0.05 / 8
    assert int((p <= 0.05 / 8).sum()) < int(rejected.sum()) <= int((p <= 0.05).sum())


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_false_alarm_share_on_exchangeable_data(alpha):
    """Calibration and test scores from one distribution: the share flagged, averaged over
    calibration sets, is floor(alpha (n+1)) / (n+1) <= alpha (within the binomial margin)."""
    g = torch.Generator().manual_seed(3)
    n, m, trials = 199, 500, 200
    shares = []
    for _ in range(trials):
        calibration = Calibration(torch.randn(n, generator=g), "energy")
        shares.append(
            float((calibration.p_values(torch.randn(m, generator=g)) <= alpha).double().mean())
        )
    mean = sum(shares) / trials
    exact = math.floor(alpha * (n + 1)) / (n + 1)
    # Each share has variance about a(1-a)/m from the test points plus a(1-a)/n from the
    # calibration set; their mean over the trials, that over `trials`.
    margin = 3 * math.sqrt(alpha * (1 - alpha) * (1 / m + 1 / n) / trials)
    assert mean <= alpha + margin
    assert abs(mean - exact) <= margin  # not trivially conservative either


# --------------------------------------------------------------------------- the wrapper
def toy(score: str = "energy") -> OODUnleash:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return OODUnleash(net, score=score)


def mean_net() -> OODUnleash:
    """Every logit is the image's mean pixel, so Energy is too (plus ln 3): images much darker
    than the ID ones score far below them."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    nn.init.constant_(net[1].weight, 1 / 16)
    nn.init.zeros_(net[1].bias)
    return OODUnleash(net, score="energy")


def id_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_predict_flags_at_most_alpha_of_id_images_and_most_far_images():
    unleashed = toy().calibrate(id_images(1000, 0), progress=False)
    for alpha in (0.01, 0.05, 0.1):
        result = unleashed.predict(id_images(4000, 1), alpha)
        share = float(result.is_ood.double().mean())
        margin = 3 * math.sqrt(alpha * (1 - alpha) * (1 / 4000 + 1 / 1000))
        assert share <= alpha + margin
        assert result.threshold is not None
        assert torch.equal(result.is_ood, result.scores.double() < result.threshold)
    dark = mean_net().calibrate(id_images(1000, 0), progress=False)
    assert dark.predict(id_images(200, 2) - 2.0, 0.05).is_ood.all()  # 8 sd below: flagged


def test_prediction_has_the_classifier_labels_and_the_default_score():
    unleashed = toy().calibrate(id_images(100, 0), progress=False)
    x = id_images(10, 5)
    result = unleashed.predict(x, alpha=0.1)
    assert torch.equal(result.labels, unleashed.model(x).argmax(1))
    assert torch.allclose(result.scores, unleashed.score(x))
    assert torch.equal(result.p_values, unleashed.calibration_.p_values(result.scores))
    assert result.score == "energy" and len(result) == 10 and "alpha=0.1" in repr(result)


def test_fdr_mode_is_benjamini_hochberg_over_the_batch():
    unleashed = mean_net().calibrate(id_images(500, 0), progress=False)
    x = torch.cat([id_images(40, 1), id_images(10, 2) - 2.0])
    result = unleashed.predict(x, alpha=0.1, fdr=True)
    assert result.fdr and result.threshold is None
    assert torch.equal(result.is_ood, benjamini_hochberg(result.p_values, 0.1))
    assert result.is_ood[40:].all()


def test_predict_before_calibrate_names_the_fix():
    with pytest.raises(NotCalibratedError, match=r"calibrate\(loader\)"):
        toy().predict(id_images(3, 0))
    with pytest.raises(NotCalibratedError):
        toy().calibration_scores_  # noqa: B018


def test_too_few_calibration_images_for_alpha():
    unleashed = toy().calibrate(id_images(50, 0), progress=False)
    unleashed.predict(id_images(3, 1), alpha=0.05)  # 50 >= 19
    with pytest.raises(ValueError, match="at least 99 calibration images.*calibrated on 50"):
        unleashed.predict(id_images(3, 1), alpha=0.01)
    with pytest.raises(ValueError, match="at least 99"):
        toy().calibrate(id_images(50, 0), alpha=0.01, progress=False)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        unleashed.predict(id_images(3, 1), alpha=5)


def test_calibration_follows_the_default_score_and_the_model():
    unleashed = toy().calibrate(id_images(50, 0), progress=False)
    unleashed.default_score = "msp"
    with pytest.raises(NotCalibratedError, match="'energy' score.*now 'msp'"):
        unleashed.predict(id_images(3, 1))
    unleashed.default_score = "energy"
    data = [(id_images(32, 3), torch.randint(0, 3, (32,)))]
    unleashed.constraint = 5.0
    unleashed.fit(data, epochs=1, flooding=False, progress=False)
    assert unleashed.calibration_ is None  # the model changed


def test_refitting_the_calibrated_score_drops_the_calibration():
    unleashed = toy("knn")
    data = [(id_images(64, 3), torch.randint(0, 3, (64,)))]
    unleashed.fit_scores(data, ["knn"], progress=False)
    unleashed.calibrate(id_images(30, 0), progress=False)
    unleashed.fit_scores(data, ["energy", "msp"], progress=False)
    assert unleashed.calibration_ is not None  # knn untouched
    unleashed.fit_scores(data, ["knn"], progress=False)
    assert unleashed.calibration_ is None
