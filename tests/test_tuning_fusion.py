"""Fused scores as tune candidates (issue 31): built from the cached validation values of each
candidate's best score families, equal to what a real read-out of the fitted fused score gives,
chosen like any other variant, and saved in the one form that reloads."""

from __future__ import annotations

import pytest

from oodunleash import proxy_ood, tune
from oodunleash.scores import Fused, ScoreSpec
from oodunleash.tuning.fusion import fusion_groups
from tests.test_tuning import FAST, data  # noqa: F401 - the module's trained toy model

SINGLES = ["energy", "msp", "mahalanobis", "knn k=1"]


def test_fused_variants_from_the_cache_equal_a_real_read_out(data):  # noqa: F811
    model, train, val = data
    options = FAST | {"scores": SINGLES, "finetunes": [], "keep_all": True, "verbose": False}
    result = tune(model, train, val, **options)
    unleashed, row = result.unleashed["unchanged"], result.candidates["unchanged"]
    fused = [label for label in row.metrics if label not in SINGLES]
    assert len(fused) == 4  # the three best families: three pairs and the triple
    proxies = proxy_ood(val, n=FAST["proxy_size"], seed=0)  # what tune validated on
    again = unleashed.evaluate(val, proxies, fused, progress=False)
    for label in fused:
        score = unleashed.fitted_scores_[label]
        assert isinstance(score, Fused) and ScoreSpec.of(score).label == label
        members = label.split(" + ")
        # the members are the fitted single variants themselves: nothing fitted again
        assert all(
            s is unleashed.fitted_scores_[m] for s, m in zip(score.scores, members, strict=True)
        )
        for ood in result.ood_sets:
            cached = row.metrics[label][ood]
            read = again.metrics[label][ood]
            assert cached["fpr95"] == pytest.approx(100 * read["fpr95"], abs=1e-6)
            assert cached["auroc"] == pytest.approx(100 * read["auroc"], abs=1e-6)


def test_fusion_zero_reads_single_scores_only_and_bad_values_are_refused(data):  # noqa: F811
    model, train, val = data
    options = FAST | {"scores": SINGLES, "finetunes": [], "verbose": False}
    result = tune(model, train, val, fusion=0, **options)
    assert set(result.candidates["unchanged"].metrics) == set(SINGLES)
    for bad in (-1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="fusion must be a whole number"):
            tune(model, train, val, fusion=bad, **options)


def test_fusion_combines_the_best_variant_of_the_best_families():
    ranking = ["odin", "knn k=1", "fused", "knn", "energy", "msp", "vim"]
    variants = {label: ScoreSpec.parse(label) for label in ranking}
    # ODIN runs the model backwards and "fused" is fused already: neither is a member;
    # KNN enters once, with its best variant.
    assert fusion_groups(ranking, variants, top=2) == [("knn k=1", "energy")]
    assert fusion_groups(ranking, variants, top=3)[-1] == ("knn k=1", "energy", "msp")
    assert fusion_groups(ranking, variants, top=1) == []
    # one member set, one label: members in the variants' order, not the candidate's ranking
    reordered = {label: variants[label] for label in ["energy", "msp", "knn k=1", "knn", "vim"]}
    assert fusion_groups(["vim", "knn k=1", "energy"], reordered, top=3)[0] == ("energy", "knn k=1")
