"""scikit-learn's digits as in- and out-of-distribution sets (oodunleash.bench.digits)."""

from __future__ import annotations

import pytest
import torch

from oodunleash.bench import datasets as ds
from tests.bench.fake_data import assert_sample


def test_digits_ood() -> None:
    digits = ds.DigitsOOD()
    assert len(digits) == 1797 and set(digits.targets.tolist()) == {-1}
    assert_sample(digits[0])
    plain, _ = ds.DigitsOOD(normalize=False).tensors()
    assert plain.min() >= 0 and plain.max() <= 1 and plain.max() > 0.9
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert plain[:, 0, border].abs().max() == 0
    normed, _ = digits.tensors()
    assert torch.allclose(normed, (plain - ds.FASHION_MNIST_MEAN) / ds.FASHION_MNIST_STD, atol=1e-5)


def test_digits_id_splits() -> None:
    parts = {s: ds.DigitsID(s, seed=0) for s in ("train", "val", "test")}
    rows = [set(p.source_indices.tolist()) for p in parts.values()]
    assert sum(map(len, rows)) == 1797 and set().union(*rows) == set(range(1797))
    assert len(parts["test"]) == pytest.approx(0.3 * 1797, abs=10)
    assert parts["train"].class_names == tuple("0123456789")
    assert_sample(parts["val"][0])
    # The test split does not move when val_fraction changes; the seed does move it.
    assert torch.equal(
        parts["test"].source_indices, ds.DigitsID("test", val_fraction=0.3).source_indices
    )
    assert not torch.equal(parts["test"].source_indices, ds.DigitsID("test", seed=1).source_indices)
    subset = ds.DigitsID("train", classes=(8, 3))
    assert subset.class_names == ("8", "3") and set(subset.targets.tolist()) == {0, 1}


def test_digits_near_ood_split() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().target
    splits = ds.digits_near_ood_split(id_classes=(0, 1, 2, 3, 4, 5), seed=2)
    assert set(splits) == {"train", "val", "test", "ood"}
    train, val = splits["train"].source_indices, splits["val"].source_indices
    assert not set(train.tolist()) & set(val.tolist())
    for name in ("train", "val", "test"):
        assert set(raw[splits[name].source_indices.numpy()]) == set(range(6))
    assert set(raw[splits["ood"].source_indices.numpy()]) == {6, 7, 8, 9}
    assert set(splits["ood"].targets.tolist()) == {-1}
    assert set(splits["ood"].source_indices.tolist()) <= set(
        ds.DigitsID("test", seed=2).source_indices.tolist()
    )
