"""Each detector against a by-hand (numpy / scikit-learn / per-sample autograd) computation of
its paper's formula on small tensors; the registry; config and state round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from torch import nn

import oodunleash
from oodunleash import OODScore, get_score, register_score
from oodunleash.features.collect import FeatureSet, LinearHead
from oodunleash.scores import REQUIREMENTS, ScoreNotFittedError, list_scores, unregister_score
from oodunleash.scores.distance import kth_neighbour_similarity
from tests.helpers.toys import sequential_cnn

CLASSES, DIM = 4, 8


@pytest.fixture(scope="module")
def data():
    """Train/test FeatureSets of non-negative (post-ReLU) features with a linear head."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    bias = torch.randn(CLASSES, generator=gen, dtype=torch.float64)
    means = 2 * torch.rand(CLASSES, DIM, generator=gen, dtype=torch.float64)

    def make(n):
        labels = torch.arange(n) % CLASSES
        feats = F.relu(
            means[labels] + 0.7 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        )
        maps = F.relu(torch.randn(n, DIM, 3, 3, generator=gen, dtype=torch.float64) + 0.3)
        return FeatureSet(
            logits=(feats @ weight.T + bias).float(),
            features=feats.float(),
            feature_maps=maps.float(),
            labels=labels,
            head=LinearHead(weight.float(), bias.float()),
        )

    return make(60), make(25)


def np_(t):
    return t.detach().double().numpy()


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np_(a) if isinstance(a, torch.Tensor) else a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- logits family
def test_msp_maxlogit_energy_entropy(data):
    _, test = data
    z = np_(test.logits)
    close(get_score("msp").score(test), softmax(z, axis=1).max(axis=1))
    close(get_score("maxlogit").score(test), z.max(axis=1))
    close(get_score("energy").score(test), logsumexp(z, axis=1))
    close(get_score("energy", temperature=2.5).score(test), 2.5 * logsumexp(z / 2.5, axis=1))
    p = softmax(z, axis=1)
    close(get_score("entropy").score(test), (p * np.log(p)).sum(axis=1))


@pytest.mark.parametrize("top_m", [100, 2])
def test_gen(data, top_m):
    _, test = data
    p = np.sort(softmax(np_(test.logits), axis=1), axis=1)[:, -top_m:]
    expected = -(p**0.1 * (1 - p) ** 0.1).sum(axis=1)
    close(get_score("gen", top_m=top_m).score(test), expected)


# --------------------------------------------------------------------------- distances
def _class_centred_precision(x, y):
    centred = np.concatenate([x[y == c] - x[y == c].mean(0) for c in np.unique(y)])
    return EmpiricalCovariance().fit(centred).precision_


def test_mahalanobis(data):
    train, test = data
    x, y = np_(train.features), train.labels.numpy()
    precision = _class_centred_precision(x, y)
    t = np_(test.features)
    dists = np.stack(
        [
            np.einsum("ij,jk,ik->i", t - x[y == c].mean(0), precision, t - x[y == c].mean(0))
            for c in range(CLASSES)
        ],
        axis=1,
    )
    close(get_score("mahalanobis").fit(train).score(test), -dists.min(axis=1), 1e-3)


def test_relative_mahalanobis(data):
    train, test = data
    x, y = np_(train.features), train.labels.numpy()
    precision = _class_centred_precision(x, y)
    background = EmpiricalCovariance().fit(x)
    t = np_(test.features)
    md = np.stack(
        [
            np.einsum("ij,jk,ik->i", t - x[y == c].mean(0), precision, t - x[y == c].mean(0))
            for c in range(CLASSES)
        ],
        axis=1,
    )
    md0 = background.mahalanobis(t)
    close(
        get_score("relative_mahalanobis").fit(train).score(test), -(md - md0[:, None]).min(1), 1e-3
    )


def test_knn(data):
    train, test = data
    bank = np_(train.features)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = np_(test.features)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dist = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1))
    kth = np.sort(dist, axis=1)[:, 4]
    close(get_score("knn", k=5).fit(train).score(test), -kth)


def test_knn_chunks_match_one_block():
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(500, 6, generator=gen), torch.randn(37, 6, generator=gen)
    full = (queries @ bank.T).topk(7, dim=1).values[:, -1]
    for budget in (5, 64, 1000, 1 << 20):
        close(kth_neighbour_similarity(queries, bank, 7, chunk_elements=budget), np_(full), 1e-5)


def test_she(data):
    train, test = data
    # Mostly correct predictions, one class never right (its pattern is zero).
    noisy = torch.randn(len(train), CLASSES, generator=torch.Generator().manual_seed(3))
    logits = 3 * F.one_hot(train.labels, CLASSES) + noisy
    logits[:, 0] -= 10
    train = FeatureSet(features=train.features, labels=train.labels, logits=logits)
    x, y, z = np_(train.features), train.labels.numpy(), np_(train.logits)
    ok = z.argmax(1) == y
    assert ok.mean() > 0.5
    patterns = np.stack(
        [x[ok & (y == c)].mean(0) if (ok & (y == c)).any() else np.zeros(DIM) for c in range(4)]
    )
    t, pred = np_(test.features), np_(test.logits).argmax(1)
    close(get_score("she").fit(train).score(test), (t * patterns[pred]).sum(1))


# --------------------------------------------------------------------------- activation shaping
def test_react(data):
    train, test = data
    w, b = np_(test.head.weight), np_(test.head.bias)
    threshold = np.percentile(np_(train.features).ravel(), 90)
    clipped = np.minimum(np_(test.features), threshold)
    score = get_score("react").fit(train)
    assert float(score.threshold) == pytest.approx(threshold, rel=1e-6)
    close(score.score(test), logsumexp(clipped @ w.T + b, axis=1))


def test_dice(data):
    train, test = data
    w, b = np_(test.head.weight), np_(test.head.bias)
    contribution = np_(train.features).mean(0)[None, :] * w
    masked = w * (contribution > np.percentile(contribution, 90))
    votes = np_(test.features)[:, None, :] * masked[None]  # the paper's per-class votes
    close(get_score("dice").fit(train).score(test), logsumexp(votes.sum(2) + b, axis=1))


def _ash_by_hand(maps, pruning, kind):
    out = []
    for sample in maps.reshape(len(maps), -1):
        n = sample.size
        k = n - int(np.round(n * pruning / 100))
        keep = np.argsort(-sample)[:k]
        pruned = np.zeros_like(sample)
        if kind == "b":
            pruned[keep] = sample.sum() / k
        else:
            pruned[keep] = sample[keep]
            if kind == "s":
                pruned *= np.exp(sample.sum() / pruned.sum())
        out.append(pruned)
    return np.stack(out).reshape(maps.shape)


@pytest.mark.parametrize(
    ("name", "kind", "pruning"), [("ash_p", "p", 60), ("ash_b", "b", 65), ("ash_s", "s", 90)]
)
def test_ash(data, name, kind, pruning):
    _, test = data
    w, b = np_(test.head.weight), np_(test.head.bias)
    shaped = _ash_by_hand(np_(test.feature_maps), pruning, kind)
    expected = logsumexp(shaped.mean(axis=(2, 3)) @ w.T + b, axis=1)  # global average pool
    score = get_score(name)
    assert score.percentile == pruning  # the paper's ImageNet defaults
    close(score.score(test), expected, 1e-3)


# --------------------------------------------------------------------------- subspace
def _vim_by_hand(train, test, dim):
    w, b = np_(train.head.weight), np_(train.head.bias)
    u = -np.linalg.pinv(w) @ b
    ec = EmpiricalCovariance(assume_centered=True).fit(np_(train.features) - u)
    values, vectors = np.linalg.eig(ec.covariance_)
    null_space = np.real(vectors[:, np.argsort(-values)[dim:]])
    residual_train = np.linalg.norm((np_(train.features) - u) @ null_space, axis=1)
    alpha = np_(train.logits).max(1).mean() / residual_train.mean()
    residual = np.linalg.norm((np_(test.features) - u) @ null_space, axis=1)
    return residual, alpha


def test_vim_and_residual(data):
    train, test = data
    residual, alpha = _vim_by_hand(train, test, dim=4)
    vim = get_score("vim", dim=4).fit(train)
    assert float(vim.alpha) == pytest.approx(alpha, rel=1e-4)
    close(vim.score(test), logsumexp(np_(test.logits), axis=1) - alpha * residual, 1e-3)
    close(get_score("residual", dim=4).fit(train).score(test), -residual, 1e-3)
    assert get_score("vim").fit(train).null_space.shape == (DIM, DIM - DIM // 2)


# --------------------------------------------------------------------------- gradients
def test_gradnorm_matches_per_sample_backward(data):
    _, test = data
    head = test.head
    expected = []
    for h in test.features:
        weight = head.weight.clone().requires_grad_(True)
        logits = (weight @ h + head.bias) / 1.0
        loss = torch.sum(-torch.full((CLASSES,), 1 / CLASSES) * torch.log_softmax(logits, dim=0))
        loss.backward()
        expected.append(weight.grad.abs().sum().item())
    close(get_score("gradnorm").score(test), np.array(expected))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@pytest.mark.parametrize("std", [None, (0.2, 0.3, 0.4)])
def test_odin_matches_per_sample_reference(std):
    net = TinyNet().eval()
    images = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    temperature, eps = 1000.0, 0.0014
    expected = []
    for x in images:
        x = x[None].clone().requires_grad_(True)
        out = net(x) / temperature
        F.cross_entropy(out, out.argmax(1)).backward()
        step = (x.grad >= 0).float() * 2 - 1
        if std is not None:
            step = step / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            moved = net(x - eps * step) / temperature
        expected.append(torch.softmax(moved, 1).max().item())
    net.zero_grad(set_to_none=True)
    got = get_score("odin", std=std).score(FeatureSet(images=images, network=net))
    close(got, np.array(expected), 1e-6)
    assert all(p.grad is None for p in net.parameters())  # no stray parameter gradients


# --------------------------------------------------------------------------- registry
REQUIRED = {
    "msp", "maxlogit", "energy", "entropy", "gen", "odin", "mahalanobis", "relative_mahalanobis",
    "knn", "react", "ash_p", "ash_b", "ash_s", "dice", "vim", "gradnorm", "she",
}  # fmt: skip


def test_registry_has_the_required_scores():
    names = oodunleash.list_scores()
    assert set(names) >= REQUIRED and len(names) >= 15
    assert names == sorted(names) == list_scores()
    for name in names:
        score = get_score(name)
        assert score.name == name == name.lower()
        assert set(score.requires) <= REQUIREMENTS and score.requires
        config = score.get_config()
        json.dumps(config)
        assert get_score(name, **config).get_config() == config
        assert score.state_dict() == {}


def test_aliases_and_case():
    assert get_score("MDS").name == "mahalanobis"
    assert get_score("ASH-S").name == "ash_s"
    assert get_score("Max_Logit").name == "maxlogit"


def test_unknown_name_lists_registered_scores():
    with pytest.raises(ValueError, match=r"Unknown OOD score 'nope'.*msp.*register_score"):
        get_score("nope")


def test_bad_config_names_the_options():
    with pytest.raises(TypeError, match="temperature"):
        get_score("energy", temprature=2)
    with pytest.raises(ValueError, match="temperature must be positive"):
        get_score("energy", temperature=0)


def test_unfitted_score_names_fit_scores(data):
    _, test = data
    with pytest.raises(ScoreNotFittedError, match="fit_scores"):
        get_score("vim").score(test)


def test_missing_input_names_the_fix():
    with pytest.raises(ValueError, match="head='fc'"):
        get_score("react").fit(FeatureSet(features=torch.rand(5, 3))).score(
            FeatureSet(features=torch.rand(2, 3))
        )


def test_register_class_instance_and_function(data):
    _, test = data

    @register_score
    class NegMaxLogit(OODScore):
        name = "test_neg_max"
        requires = frozenset({"logits"})

        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def score(self, d):
            return -self.scale * d.logits.max(1).values

    try:
        assert "test_neg_max" in list_scores()
        close(get_score("test_neg_max", scale=2.0).score(test), -2 * np_(test.logits).max(1))
        with pytest.raises(ValueError, match="already registered"):
            register_score(NegMaxLogit)
        register_score(NegMaxLogit(scale=3.0), name="test_neg_max3")
        assert get_score("test_neg_max3").get_config() == {"scale": 3.0}
        assert get_score("test_neg_max3").name == "test_neg_max3"
        register_score(lambda d: d.logits.mean(1), name="test_mean_logit", requires={"logits"})
        close(get_score("test_mean_logit").score(test), np_(test.logits).mean(1))
        with pytest.raises(ValueError, match="requires"):
            register_score(lambda d: d.logits, name="test_bad")
        with pytest.raises(ValueError, match="unknown inputs"):
            register_score(lambda d: d.logits, name="test_bad", requires={"pixels"})
    finally:
        for name in ("test_neg_max", "test_neg_max3", "test_mean_logit"):
            if name in list_scores():
                unregister_score(name)
    assert "test_neg_max" not in list_scores()


FITTED = ["mahalanobis", "relative_mahalanobis", "knn", "react", "dice", "vim", "residual", "she"]


@pytest.mark.parametrize("name", FITTED)
def test_state_dict_round_trip(data, name):
    train, test = data
    config = {"max_saved": None, "save_dtype": "float32"} if name == "knn" else {}
    fitted = get_score(name, **config).fit(train)
    assert fitted.needs_fit and fitted.is_fitted
    state = fitted.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    restored = get_score(name, **fitted.get_config())
    assert not restored.is_fitted
    restored.load_state_dict(state)
    close(restored.score(test), np_(fitted.score(test)), 1e-5)
    with pytest.raises(ValueError, match="expected keys"):
        get_score(name).load_state_dict({"bogus": torch.zeros(1)})


def test_knn_compact_state(data):
    train, test = data
    knn = get_score("knn", k=8, max_saved=15).fit(train)
    state = knn.state_dict()
    assert state["bank"].shape == (15, DIM) and state["bank"].dtype == torch.float16
    assert float(state["k_scale"]) == pytest.approx(15 / 60)
    restored = get_score("knn", **knn.get_config()).load_state_dict(state)
    assert restored.effective_k == 2
    assert knn.effective_k == 8 and len(knn.bank) == 60  # the live bank is untouched
    # The default keeps a CIFAR-sized bank whole, in float16.
    whole = get_score("knn", k=8).fit(train)
    again = get_score("knn", k=8).load_state_dict(whole.state_dict())
    close(again.score(test), np_(whole.score(test)), 2e-3)


# --------------------------------------------------------------------------- threads
def test_scoring_from_two_threads_at_once_matches_single_thread_results():
    """KNN and ViM read the penultimate features through hooks on the shared model: each
    thread must get its own batch's features, every time."""
    import threading

    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = sequential_cnn(1, 32, 4, hidden=16, pool=2)
    train = DataLoader(
        TensorDataset(torch.randn(64, 1, 16, 16), torch.randint(0, 4, (64,))), batch_size=32
    )
    unleashed = oodunleash.OODUnleash(net).fit_scores(train, ["knn", "vim"], progress=False)
    # Batches large enough that torch releases the GIL mid-forward (per-call hooks failed here
    # 6-18 times in 250 calls).
    batches = {"knn": torch.randn(32, 1, 16, 16), "vim": 3 * torch.randn(32, 1, 16, 16)}
    expected = {name: unleashed.score(x, name) for name, x in batches.items()}
    rounds, wrong, errors = 250, {"knn": 0, "vim": 0}, []
    start = threading.Barrier(2)

    def work(name):
        try:
            start.wait()
            for _ in range(rounds):
                if not torch.equal(unleashed.score(batches[name], name), expected[name]):
                    wrong[name] += 1
        except Exception as err:  # reported below; a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == {"knn": 0, "vim": 0}
