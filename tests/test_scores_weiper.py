"""WeiPer+KLD: against a per-sample numpy/scipy computation of the paper's formula on tiny
tensors, ID above OOD on a constructed case, determinism, and state/config/checkpoint round
trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from scipy.stats import entropy

from oodunleash import OODUnleash
from oodunleash.features import FeatureSet, LinearHead
from oodunleash.scores import WeiPer, get_score, list_scores, score_grids
from oodunleash.scores import weiper as weiper_module
from oodunleash.scores.weiper import row_histograms, smooth, unit_directions

SMALL = {
    "repeats": 4,
    "bins": 6,
    "smoothing": 3,
    "smoothing_perturbed": 2,
    "delta": 0.7,
    "lambda_1": 0.5,
    "lambda_2": 2.0,
    "epsilon": 0.05,
    "epsilon_perturbed": 0.02,
    "seed": 5,
}


def tiny_set(n: int, seed: int, *, shift: float = 0.0) -> FeatureSet:
    head_gen = torch.Generator().manual_seed(11)
    weight = torch.randn(3, 5, generator=head_gen)
    bias = torch.randn(3, generator=head_gen)
    gen = torch.Generator().manual_seed(seed)
    feats = F.relu(torch.randn(n, 5, generator=gen) + 1 + shift)
    return FeatureSet(features=feats, head=LinearHead(weight, bias))


def _hist(values, low, high, bins):
    """np.histogram over [low, high] (the right edge in the last bin), as fractions."""
    return np.histogram(values, bins=bins, range=(low, high))[0] / len(values)


def _smooth(hist, size):
    left = (size - 1) // 2
    padded = np.concatenate([[hist[0]] * left, hist, [hist[-1]] * (size - 1 - left)])
    return np.array([padded[j : j + size].mean() for j in range(len(hist))])


def _sym_kl(p, q, eps):
    # scipy's entropy(p, q) renormalises both to sum 1, then sums p log(p / q).
    return entropy(p + eps, q + eps) + entropy(q + eps, p + eps)


def _weiper_by_hand(train: FeatureSet, test: FeatureSet, o: dict) -> np.ndarray:
    w, b = train.head.weight.double().numpy(), train.head.bias.double().numpy()
    classes, dim = w.shape
    units = unit_directions(o["repeats"], classes, dim, o["seed"]).double().numpy()

    def perturbed(z):  # one sample: r heads, each class perturbed by its own direction
        rows = []
        for i in range(o["repeats"]):
            heads = [
                w[c] + o["delta"] * np.linalg.norm(w[c]) * units[i * classes + c]
                for c in range(classes)
            ]
            rows.append(np.array(heads) @ z + b)
        return np.array(rows)  # (r, C)

    x_train = train.features.double().numpy()
    t_train = [perturbed(z).ravel() for z in x_train]
    f_lo, f_hi = x_train.min(), x_train.max()
    t_lo, t_hi = min(t.min() for t in t_train), max(t.max() for t in t_train)
    p_feat = np.mean([_hist(z, f_lo, f_hi, o["bins"]) for z in x_train], axis=0)
    p_logit = np.mean([_hist(t, t_lo, t_hi, o["bins"]) for t in t_train], axis=0)
    out = []
    for z in test.features.double().numpy():
        logits = perturbed(z)
        q_feat = _smooth(_hist(z, f_lo, f_hi, o["bins"]), o["smoothing"])
        q_logit = _smooth(_hist(logits.ravel(), t_lo, t_hi, o["bins"]), o["smoothing_perturbed"])
        msp = softmax(logits, axis=1).max(axis=1).mean()
        kl = _sym_kl(p_feat, q_feat, o["epsilon"])
        kl_w = _sym_kl(p_logit, q_logit, o["epsilon_perturbed"])
        out.append(-(kl + o["lambda_1"] * kl_w) + o["lambda_2"] * msp)
    return np.array(out)


def test_weiper_matches_a_per_sample_hand_computation():
    train, test = tiny_set(40, 0), tiny_set(12, 1, shift=0.5)  # some test values out of range
    score = get_score("weiper", **SMALL).fit(train)
    np.testing.assert_allclose(score.score(test).numpy(), _weiper_by_hand(train, test, SMALL), 1e-4)


def test_weiper_helpers_by_hand():
    values = torch.tensor([[0.0, 0.2, 0.5, 1.0, -1.0, 2.0]])
    np.testing.assert_allclose(row_histograms(values, 0.0, 1.0, 4)[0], [2 / 6, 0, 1 / 6, 1 / 6])
    hist = torch.tensor([[0.1, 0.4, 0.0, 0.3, 0.2]], dtype=torch.float64)
    for size in (1, 2, 4, 7):
        np.testing.assert_allclose(smooth(hist, size)[0], _smooth(hist[0].numpy(), size))
    units = unit_directions(3, 2, 4, seed=1)
    assert torch.allclose(units.norm(dim=1), torch.ones(6))
    assert torch.equal(units, unit_directions(3, 2, 4, seed=1))
    assert not torch.equal(units, unit_directions(3, 2, 4, seed=2))


def test_weiper_perturbed_logits_with_delta_zero_repeat_the_head():
    data = tiny_set(6, 0)
    logits = get_score("weiper", delta=0.0, repeats=3).perturbed_logits(data.features, data)
    assert torch.allclose(logits, data.head(data.features).repeat(1, 3), atol=1e-5)


# --------------------------------------------------------------------------- ID above OOD
def collapsed(n: int, seed: int, kind: str = "id") -> FeatureSet:
    """Four classes on disjoint blocks of 16 of 64 post-ReLU dimensions, the head's weights
    along the class means; OOD sits between the classes, or has small or large activations."""
    means = torch.zeros(4, 64)
    for c in range(4):
        means[c, 16 * c : 16 * c + 16] = 3.0
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 64, generator=gen)
    if kind == "small":
        feats = F.relu(0.3 * noise)
    else:
        centre = means[torch.arange(n) % 4] if kind == "id" else means.mean(0)
        feats = F.relu(centre + 0.5 * noise)
    return FeatureSet(features=feats, head=LinearHead(means / 3, torch.zeros(4)))


@pytest.mark.parametrize("kind", ["between", "small"])
def test_weiper_scores_id_above_ood(kind):
    score = get_score("weiper").fit(collapsed(200, 0))
    id_scores, ood_scores = score.score(collapsed(50, 1)), score.score(collapsed(50, 2, kind))
    assert bool(id_scores.min() > ood_scores.max()), (id_scores, ood_scores)


# --------------------------------------------------------------------------- determinism, state
def test_weiper_is_deterministic_and_chunked(monkeypatch):
    train, test = tiny_set(40, 0), tiny_set(30, 1)
    first = get_score("weiper", seed=3).fit(train).score(test)
    again = get_score("weiper", seed=3).fit(train)
    assert torch.equal(again.score(test), first) and torch.equal(again.score(test), first)
    assert not torch.allclose(get_score("weiper", seed=4).fit(train).score(test), first)
    monkeypatch.setattr(weiper_module, "CHUNK_LOGITS", 7 * 100 * 3)  # 7 rows a chunk
    chunked = get_score("weiper", seed=3).fit(train)
    torch.testing.assert_close(chunked.state_dict(), again.state_dict())
    torch.testing.assert_close(chunked.score(test), first)


def test_weiper_state_and_config_round_trip():
    train, test = tiny_set(40, 0), tiny_set(10, 1)
    fitted = get_score("weiper", **SMALL).fit(train)
    state = fitted.state_dict()
    assert set(state) == set(WeiPer.state_keys)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["feature_density"].shape == state["logit_density"].shape == (6,)
    config = json.loads(json.dumps(fitted.get_config()))
    assert config == SMALL
    restored = get_score("weiper", **config)
    assert not restored.is_fitted and restored.state_dict() == {}
    restored.load_state_dict(state)
    assert torch.equal(restored.score(test), fitted.score(test))
    with pytest.raises(ValueError, match="bins=100"):
        get_score("weiper").load_state_dict(state).score(test)
    with pytest.raises(ValueError, match="expected keys"):
        get_score("weiper").load_state_dict({"bogus": torch.zeros(1)})


def test_weiper_refuses_bad_options_and_empty_fits():
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        get_score("weiper", repeats=0)
    with pytest.raises(ValueError, match="smoothing_perturbed must be"):
        get_score("weiper", smoothing_perturbed=1.5)
    with pytest.raises(ValueError, match="delta must be non-negative"):
        get_score("weiper", delta=-1)
    with pytest.raises(ValueError, match="at least one ID training sample"):
        get_score("weiper").fit(tiny_set(0, 0))
    empty = get_score("weiper").fit(tiny_set(5, 0)).score(tiny_set(0, 1))
    assert empty.shape == (0,)


def test_weiper_is_registered_with_a_tune_grid():
    assert "weiper" in list_scores() and get_score("WeiPer_KLD").name == "weiper"
    option, _, values = score_grids()["weiper"]
    assert option == "delta" and 1.8 in values
    assert get_score("weiper").requires == {"features", "head"}


def test_weiper_checkpoint_round_trip(tmp_path):
    from tests.checkpoint.builders import TinyNet, assert_same_scoring, images, loader

    torch.manual_seed(0)
    variant = get_score("weiper", delta=2.4, repeats=8, seed=1)
    wrapper = OODUnleash(TinyNet(), "um", score="weiper")
    wrapper.fit_scores(
        loader(), {"weiper": get_score("weiper"), "variant": variant}, progress=False
    )
    folder = wrapper.save_pretrained(tmp_path / "ckpt")
    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert loaded.fitted_scores_["variant"].get_config() == variant.get_config()
    assert_same_scoring(wrapper, loaded, images())
