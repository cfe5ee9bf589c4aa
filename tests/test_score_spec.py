"""oodunleash.scores.ScoreSpec: one form of a configured score (name + options)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from oodunleash import OODUnleash
from oodunleash.scores import ScoreSpec, get_score, list_scores
from oodunleash.scores.resolve import resolve_scores
from oodunleash.tuning import score_variants


@pytest.mark.parametrize("label", list(score_variants(None)))
def test_every_variant_label_round_trips(label):
    spec = ScoreSpec.parse(label)
    assert spec.label == label
    assert ScoreSpec.from_json(spec.to_json()) == spec
    assert ScoreSpec.of(spec.build()) == spec  # an instance's spec is the one it was built from
    assert hash(ScoreSpec.parse(label)) == hash(spec)


def test_options_are_normalised_against_the_registered_defaults():
    assert ScoreSpec("knn", {"k": 50}) == ScoreSpec("knn") and ScoreSpec("knn").label == "knn"
    assert ScoreSpec("ebo") == ScoreSpec("energy")  # an alias
    assert ScoreSpec("react", {"percentile": 85}).options == {"percentile": 85.0}
    # An older checkpoint recorded every option: the same spec.
    full = {"name": "knn", "config": get_score("knn", k=1).get_config()}
    assert ScoreSpec.from_json(full) == ScoreSpec("knn", {"k": 1})


def test_bad_names_and_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="Unknown OOD score 'nope'"):
        ScoreSpec("nope")
    with pytest.raises(TypeError, match="Its options are: k"):
        ScoreSpec("knn", {"kk": 1})
    with pytest.raises(ValueError, match="e.g. 'knn k=1'"):
        ScoreSpec.parse("knn k")


def test_a_spec_pickles_deep_copies_and_cannot_be_changed():
    spec = ScoreSpec("dice", {"sparsity": 0.5})
    assert pickle.loads(pickle.dumps(spec)) == spec and copy.deepcopy(spec) == spec
    with pytest.raises(TypeError):
        spec.options["sparsity"] = 0.7  # type: ignore[index]


def test_find_returns_the_fitted_copy_under_any_key():
    fitted = get_score("knn", k=1)
    fitted.bank = torch.randn(4, 3)
    fitted.k_scale = torch.tensor(1.0)
    store = {"knn": fitted, "knn k=10": get_score("knn", k=10)}
    assert ScoreSpec("knn", {"k": 1}).find(store) == ("knn", fitted)
    assert ScoreSpec("knn", {"k": 5}).find(store) is None
    # Resolving the spec or its label gives the fitted copy under the key it was stored under.
    assert resolve_scores(ScoreSpec("knn", {"k": 1}), store) == {"knn": fitted}
    assert resolve_scores("knn k=1", store) == {"knn": fitted}


def test_the_wrapper_takes_a_spec_or_a_label_as_its_default_score():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    for score in (ScoreSpec("react", {"percentile": 85}), "react p=85"):
        unleashed = OODUnleash(net, score=score)
        assert unleashed.get_params()["score"] == {"name": "react", "config": {"percentile": 85.0}}
    assert set(list_scores()) == {s.split()[0] for s in score_variants(None)}


def test_a_fused_score_is_labelled_by_its_members():
    from oodunleash.scores import Fused, resolve_score

    spec = ScoreSpec.parse("knn k=1 + energy")
    assert spec.name == "fused" and spec.options == {"members": [["knn", {"k": 1}], ["energy", {}]]}
    assert spec.label == "knn k=1 + energy" and ScoreSpec.parse(spec.label) == spec
    built = resolve_score("knn k=1 + energy")
    assert isinstance(built, Fused) and built.scores[0].k == 1
    assert ScoreSpec.of(built) == spec
    # the registered default members keep the bare name; other options are spelled out
    assert ScoreSpec.parse("knn + mahalanobis").label == "fused"
    ranked = ScoreSpec("fused", {"members": ["msp", "energy"], "method": "rank"})
    assert ScoreSpec.parse(ranked.label) == ranked
    with pytest.raises(ValueError, match="Unknown OOD score"):
        ScoreSpec.parse("knn + nope")
