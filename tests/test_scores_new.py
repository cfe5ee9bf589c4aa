"""The issue-31 scores (SCALE, NNGuide, fDBD, NCI, fused) and Mahalanobis' shrinkage: each
against a by-hand numpy computation of its paper's formula on small tensors, on a constructed
ID/OOD case, and through state and checkpoint round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf

from oodunleash import OODUnleash
from oodunleash.features import FeatureSet, LinearHead
from oodunleash.scores import Fused, ScoreSpec, fuse, get_score, list_scores, score_grids
from oodunleash.scores.fusion import normalise
from oodunleash.scores.neighbors import mean_top_k_similarity

CLASSES, DIM = 4, 8


def make_set(n: int, seed: int, *, dim: int = DIM, scale: float = 1.0) -> FeatureSet:
    """Non-negative (post-ReLU) features around class means, with a fixed linear head."""
    head_gen = torch.Generator().manual_seed(100)
    weight = torch.randn(CLASSES, dim, generator=head_gen, dtype=torch.float64)
    bias = torch.randn(CLASSES, generator=head_gen, dtype=torch.float64)
    means = 2 * torch.rand(CLASSES, dim, generator=head_gen, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    feats = F.relu(scale * means[labels] + 0.7 * noise)
    return FeatureSet(
        logits=(feats @ weight.T + bias).float(),
        features=feats.float(),
        labels=labels,
        head=LinearHead(weight.float(), bias.float()),
    )


@pytest.fixture(scope="module")
def data():
    return make_set(60, 0), make_set(25, 1)


def np_(t):
    return t.detach().double().numpy()


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np_(a) if isinstance(a, torch.Tensor) else a, b, rtol=tol, atol=tol)


def head_np(data):
    return np_(data.head.weight), np_(data.head.bias)


# --------------------------------------------------------------------------- SCALE
@pytest.mark.parametrize("percentile", [85.0, 50.0])
def test_scale_matches_hand_computation(data, percentile):
    _, test = data
    x = np_(test.features)
    w, b = head_np(test)
    k = DIM - int(np.round(DIM * percentile / 100))
    top = np.sort(x, axis=1)[:, -k:].sum(1)
    scaled = x * np.exp(x.sum(1) / top)[:, None]
    close(get_score("scale", percentile=percentile).score(test), logsumexp(scaled @ w.T + b, 1))


def test_scale_leaves_an_all_zero_feature_unscaled(data):
    _, test = data
    zero = FeatureSet(features=torch.zeros(2, DIM), head=test.head)
    close(get_score("scale").score(zero), logsumexp(np.tile(head_np(test)[1], (2, 1)), 1))


def test_scale_refuses_a_bad_percentile():
    with pytest.raises(ValueError, match="percentile must be in"):
        get_score("scale", percentile=100)


# --------------------------------------------------------------------------- NNGuide
def _nnguide_by_hand(train, test, k):
    bank = np_(train.features)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    bank *= logsumexp(np_(train.logits), 1)[:, None]
    q = np_(test.features)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    guidance = np.sort(q @ bank.T, axis=1)[:, -k:].mean(1)
    return logsumexp(np_(test.logits), 1) * guidance


@pytest.mark.parametrize("k", [1, 10])
def test_nnguide_matches_hand_computation(data, k):
    train, test = data
    close(get_score("nnguide", k=k).fit(train).score(test), _nnguide_by_hand(train, test, k))


def test_nnguide_bank_fraction_and_chunks(data):
    train, test = data
    sub = get_score("nnguide", sample_fraction=0.25, seed=3).fit(train)
    assert sub.bank.shape == (15, DIM)
    queries, bank = torch.randn(7, 5), torch.randn(40, 5)
    whole = mean_top_k_similarity(queries, bank, 6)
    close(mean_top_k_similarity(queries, bank, 6, chunk_elements=12), np_(whole))
    close(whole, np.sort(np_(queries) @ np_(bank).T, 1)[:, -6:].mean(1))


# --------------------------------------------------------------------------- fDBD
@pytest.mark.parametrize("normalizer", ["distance", "norm"])
def test_fdbd_matches_hand_computation(data, normalizer):
    train, test = data
    x = np_(test.features)
    w, b = head_np(test)
    logits = x @ w.T + b
    expected = []
    for row, z in zip(logits, x, strict=True):
        p = row.argmax()
        others = [c for c in range(CLASSES) if c != p]
        dists = [abs(row[p] - row[c]) / np.linalg.norm(w[p] - w[c]) for c in others]
        centre = np_(train.features).mean(0) if normalizer == "distance" else 0
        expected.append(sum(dists) / (CLASSES - 1))
        expected[-1] /= np.linalg.norm(z - centre)
    close(get_score("fdbd", normalizer=normalizer).fit(train).score(test), expected)


# --------------------------------------------------------------------------- NCI
@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_matches_hand_computation(data, alpha):
    train, test = data
    x = np_(test.features)
    w, b = head_np(test)
    pred = (x @ w.T + b).argmax(1)
    centred = x - np_(train.features).mean(0)
    align = (w[pred] * centred).sum(1) / np.linalg.norm(centred, axis=1)
    expected = align + alpha * np.abs(x).sum(1)
    close(get_score("nci", alpha=alpha).fit(train).score(test), expected)


# --------------------------------------------------------------------------- ID above OOD
def collapsed_set(n: int, seed: int, *, ood: bool = False) -> FeatureSet:
    """A neurally collapsed toy: class means along orthogonal blocks, the head's weights the
    means; OOD features sit between the classes (the mean of all of them) with the same noise."""
    means = torch.zeros(CLASSES, DIM)
    for c in range(CLASSES):
        means[c, 2 * c : 2 * c + 2] = 3.0
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    centre = means.mean(0).expand(n, DIM) if ood else means[labels]
    feats = F.relu(centre + 0.3 * torch.randn(n, DIM, generator=gen))
    head = LinearHead(means / 3, torch.zeros(CLASSES))
    return FeatureSet(logits=head(feats), features=feats, labels=labels, head=head)


@pytest.mark.parametrize("name", ["nnguide", "fdbd", "nci", "fused", "mahalanobis"])
def test_constructed_id_scores_above_ood_between_the_classes(name):
    train, test, ood = collapsed_set(200, 0), collapsed_set(40, 1), collapsed_set(40, 2, ood=True)
    config = {"members": ["nci", "fdbd"]} if name == "fused" else {}
    score = get_score(name, **config).fit(train)
    id_scores, ood_scores = score.score(test), score.score(ood)
    assert bool((id_scores.min() > ood_scores.max()).all()), (id_scores, ood_scores)


def test_scale_scores_spread_activations_above_concentrated_ones():
    """SCALE's premise: of two samples with the same activation sum, and a head that reads
    only that sum, the one whose activations are spread (ID-like) scores higher."""
    gen = torch.Generator().manual_seed(0)
    spread = 1 + torch.rand(30, DIM, generator=gen)
    spiky = torch.zeros(30, DIM)
    spiky[torch.arange(30), torch.randint(DIM, (30,), generator=gen)] = spread.sum(1)
    head = LinearHead(
        torch.ones(CLASSES, DIM) * torch.arange(1.0, CLASSES + 1)[:, None], torch.zeros(CLASSES)
    )
    scale = get_score("scale", percentile=50)
    ranked = scale.score(FeatureSet(features=spread, head=head)) > scale.score(
        FeatureSet(features=spiky, head=head)
    )
    assert bool(ranked.all())
    # Energy alone cannot tell them apart: the logits are the same.
    assert torch.allclose(head(spread), head(spiky))


# --------------------------------------------------------------------------- Mahalanobis
def test_mahalanobis_ledoit_wolf_matches_sklearn_with_fewer_samples_than_dims():
    train, test = make_set(12, 0, dim=20), make_set(9, 1, dim=20)
    x, y = np_(train.features), train.labels.numpy()
    centred = np.concatenate([x[y == c] - x[y == c].mean(0) for c in range(CLASSES)])
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    t = np_(test.features)
    dists = np.stack(
        [
            np.einsum("ij,jk,ik->i", t - x[y == c].mean(0), precision, t - x[y == c].mean(0))
            for c in range(CLASSES)
        ],
        axis=1,
    )
    auto = get_score("mahalanobis").fit(train)  # 12 samples <= 20 dims: shrinks
    close(auto.score(test), -dists.min(1), 1e-3)
    close(
        get_score("mahalanobis", covariance="ledoit_wolf").fit(train).score(test),
        np_(auto.score(test)),
    )
    empirical = get_score("mahalanobis", covariance="empirical").fit(train).score(test)
    assert not np.allclose(np_(empirical), -dists.min(1), rtol=1e-2)


def test_mahalanobis_auto_keeps_the_empirical_covariance_with_enough_samples(data):
    train, test = data
    auto = get_score("mahalanobis").fit(train).score(test)
    close(auto, np_(get_score("mahalanobis", covariance="empirical").fit(train).score(test)))
    rmd = get_score("relative_mahalanobis", covariance="ledoit_wolf").fit(train)
    assert rmd.get_config() == {"covariance": "ledoit_wolf"}
    with pytest.raises(ValueError, match="covariance must be one of"):
        get_score("mahalanobis", covariance="oas")


# --------------------------------------------------------------------------- fusion
def test_fuse_z_and_rank_by_hand():
    a, b = np.array([0.0, 1.0, 5.0]), np.array([10.0, -3.0, 2.0])
    ref_a, ref_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 4.0, 6.0])
    values = {"a": torch.tensor(a), "b": torch.tensor(b)}
    refs = {"a": torch.tensor(ref_a), "b": torch.tensor(ref_b)}
    z = ((a - ref_a.mean()) / ref_a.std(ddof=1) + (b - ref_b.mean()) / ref_b.std(ddof=1)) / 2
    close(fuse(values, refs, "z"), z)

    def rank(v, ref):
        return np.array([((ref < x).sum() + (ref <= x).sum()) / (2 * len(ref)) for x in v])

    close(fuse(values, refs, "rank"), (rank(a, ref_a) + rank(b, ref_b)) / 2)
    close(normalise(torch.tensor([1.0]), torch.tensor(ref_b), "rank"), [0.25])


def test_fuse_refuses_mismatched_members_and_lengths():
    one = torch.zeros(3)
    with pytest.raises(ValueError, match="exactly the members"):
        fuse({"a": one}, {"b": one})
    with pytest.raises(ValueError, match="same length"):
        fuse({"a": one, "b": torch.zeros(4)}, {"a": one, "b": one})
    with pytest.raises(ValueError, match="method must be one of"):
        fuse({"a": one}, {"a": one}, "mean")


def test_fused_score_is_fuse_of_its_members(data):
    train, test = data
    members = [("knn", {"k": 5}), "mahalanobis", ("energy", {"temperature": 2.0})]
    fused = get_score("fused", members=members, method="rank", reference_fraction=0.0)
    fused.fit(train)
    assert fused.requires == {"features", "labels", "logits"}
    singles = [
        get_score("knn", k=5),
        get_score("mahalanobis"),
        get_score("energy", temperature=2.0),
    ]
    values = {s.name: s.fit(train).score(test) for s in singles}
    refs = {s.name: s.score(train) for s in singles}
    close(fused.score(test), np_(fuse(values, refs, "rank")))


def test_fused_holds_out_its_reference(data):
    train, test = data
    fused = get_score("fused", members=[("knn", {"k": 5}), "nci"]).fit(train)
    assert fused.reference.shape == (2, 12)  # 20% of 60 held out
    assert fused.scores[0].bank.shape == (48, DIM)
    label_values = {"knn": torch.arange(5.0), "nci": torch.arange(5.0)}
    fused.set_reference(label_values)
    close(fused.reference[1], np.arange(5.0))
    small = train.select(slice(0, 5))
    with pytest.warns(UserWarning, match="too few on one side"):
        members = [("knn", {"k": 2}), "nci"]
        tiny = get_score("fused", members=members).fit(small)
    assert tiny.reference.shape == (2, 5)
    with pytest.raises(ValueError, match="at least two ID training samples"):
        get_score("fused").fit(train.select(slice(0, 1)))


def test_fused_members_from_spec_objects():
    from dataclasses import dataclass

    @dataclass
    class Spec:
        name: str
        options: dict

    fused = get_score("fused", members=[Spec("KNN", {"k": 7}), Spec("energy", {})])
    assert fused.members == [["knn", {"k": 7}], ["energy", {}]]
    assert fused.scores[0].k == 7


def test_fused_refuses_bad_members():
    with pytest.raises(ValueError, match="at least two members"):
        get_score("fused", members=["knn"])
    with pytest.raises(ValueError, match="fuse their values"):
        get_score("fused", members=["knn", "odin"])
    with pytest.raises(ValueError, match="Unknown OOD score"):
        get_score("fused", members=["knn", "nope"])


@pytest.mark.parametrize(
    "name, config",
    [
        ("nnguide", {"k": 3}),
        ("fdbd", {}),
        ("nci", {"alpha": 0.001}),
        ("mahalanobis", {"covariance": "ledoit_wolf"}),
        ("fused", {"members": [["knn", {"k": 5}], ["nci", {}], ["energy", {}]], "method": "rank"}),
    ],
)
def test_state_dict_round_trip(data, name, config):
    train, test = data
    fitted = get_score(name, **config).fit(train)
    state = fitted.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    json.dumps(fitted.get_config())
    restored = get_score(name, **fitted.get_config())
    assert not restored.is_fitted and restored.state_dict() == {}
    restored.load_state_dict(state)
    close(restored.score(test), np_(fitted.score(test)), 1e-5)
    with pytest.raises(ValueError, match="expected keys"):
        get_score(name, **config).load_state_dict({"bogus": torch.zeros(1)})


def test_score_grids_declare_the_new_hyperparameters():
    grids = score_grids()
    assert grids["scale"][0] == "percentile" and 85.0 in grids["scale"][2]
    assert grids["nnguide"][0] == "k" and grids["nci"][0] == "alpha"
    for name, (option, _, values) in grids.items():
        for value in values:
            assert get_score(name, **{option: value}).get_config()[option] == value
    assert {"scale", "nnguide", "fdbd", "nci", "fused"} <= set(list_scores())


# --------------------------------------------------------------------------- checkpoints
FUSED = {"members": [["knn", {"k": 5}], ["fdbd", {}], ["energy", {}]], "method": "z"}


@pytest.mark.parametrize(
    "name, config",
    [
        ("scale", {"percentile": 70.0}),
        ("nnguide", {"k": 5}),
        ("fdbd", {"normalizer": "norm"}),
        ("nci", {"alpha": 0.001}),
        ("mahalanobis", {"covariance": "ledoit_wolf"}),
        ("fused", FUSED),
    ],
)
def test_checkpoint_round_trip_as_default_and_named_score(tmp_path, name, config):
    from tests.checkpoint.builders import TinyNet, assert_same_scoring, images, loader

    torch.manual_seed(0)
    variant = get_score(name, **config)
    wrapper = OODUnleash(TinyNet(), "um", score=name)
    defaults = {"members": FUSED["members"]} if name == "fused" else {}
    scores = {name: get_score(name, **defaults), "variant": variant}
    wrapper.fit_scores(loader(), scores, progress=False)
    assert all(s.is_fitted for s in wrapper.fitted_scores_.values())
    folder = wrapper.save_pretrained(tmp_path / "ckpt")
    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert loaded.fitted_scores_["variant"].get_config() == variant.get_config()
    assert_same_scoring(wrapper, loaded, images())


def test_fused_from_fitted_members_and_cached_reference(data, tmp_path):
    """What a search holds (fitted variants, their validation scores) becomes a saveable
    fused score without fitting anything again."""
    train, test = data
    knn = get_score("knn", k=3, save_dtype="float32").fit(train)
    nci = get_score("nci").fit(train)
    val = make_set(30, 7)
    cached = {"knn k=3": knn.score(val), "nci": nci.score(val)}
    fused = Fused.from_fitted({"knn k=3": knn, "nci": nci}, cached, method="rank")
    # Members are kept as the options that differ from the defaults: the label reads well.
    assert fused.scores[0] is knn and fused.get_config()["members"][0] == [
        "knn",
        {"k": 3, "save_dtype": "float32"},
    ]
    label = ScoreSpec.of(fused).label  # not the default normalisation: options spelled out
    assert label.startswith("fused members=") and label.endswith(" method=rank")
    assert ScoreSpec.parse(label) == ScoreSpec.of(fused)
    as_z = ScoreSpec.of(Fused.from_fitted({"knn k=3": knn, "nci": nci}, cached))
    assert as_z.label == "knn k=3 save_dtype=float32 + nci"
    assert ScoreSpec.parse(as_z.label) == as_z
    expected = fuse(
        {"a": knn.score(test), "b": nci.score(test)},
        {"a": cached["knn k=3"], "b": cached["nci"]},
        "rank",
    )
    close(fused.score(test), np_(expected))
    # values the members computed already (tune's cache) fuse to the same scores
    close(fused.combine([knn.score(test), nci.score(test)]), np_(expected))
    with pytest.raises(ValueError, match="one tensor per member"):
        fused.combine([knn.score(test)])
    restored = get_score("fused", **fused.get_config()).load_state_dict(fused.state_dict())
    close(restored.score(test), np_(expected))
    with pytest.raises(ValueError, match="not fitted"):
        Fused.from_fitted([get_score("knn"), nci], [cached["nci"], cached["nci"]])
    with pytest.raises(ValueError, match="No ID reference"):
        Fused.from_fitted({"knn": knn, "nci": nci}, {"knn": cached["nci"]})
