"""oodunleash.bench.datasets: argument checks of every set, the OOD sets of each benchmark."""

from __future__ import annotations

import pathlib

import pytest
import torch

from oodunleash.bench import datasets as ds
from tests.bench.fake_data import assert_sample, write_fake_fmnist


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ds.FashionMNIST("validation"), ValueError, "Unknown split 'validation'"),
        (lambda: ds.load_fashion_mnist("dev"), ValueError, "Unknown split"),
        (lambda: ds.FashionMNIST(classes=[3, 10]), ValueError, r"\[10\] out of range"),
        (lambda: ds.FashionMNIST(classes=[-1]), ValueError, "out of range"),
        (lambda: ds.FashionMNIST(classes=[]), ValueError, "classes is empty"),
        (lambda: ds.FashionMNIST(classes=[1, 1]), ValueError, "duplicates"),
        (lambda: ds.FashionMNIST(classes=[2.5]), TypeError, "sequence of integers"),
        (lambda: ds.near_ood_split(id_classes=()), ValueError, "empty"),
        (lambda: ds.near_ood_split(id_classes=range(10)), ValueError, "hold at least one"),
        (
            lambda: ds.near_ood_split(val_fraction=1.0),
            ValueError,
            r"val_fraction must be in \[0, 1\)",
        ),
        (lambda: ds.near_ood_split(val_fraction=-0.1), ValueError, "val_fraction"),
        (lambda: ds.DigitsID("holdout"), ValueError, "Unknown split"),
        (lambda: ds.DigitsID(val_fraction=1.5), ValueError, "val_fraction"),
        (lambda: ds.DigitsID(test_fraction=0.0), ValueError, "test_fraction"),
        (lambda: ds.DigitsID(classes=[12]), ValueError, "out of range"),
        (lambda: ds.digits_near_ood_split(id_classes=range(10)), ValueError, "hold at least one"),
        (lambda: ds.NoiseOOD("pink"), ValueError, "Unknown noise kind"),
        (lambda: ds.SamplePhotoCrops(min_size=50, max_size=20), ValueError, "min_size"),
        (lambda: ds.ood_sets("cifar"), ValueError, "Unknown in-distribution kind"),
    ],
)
def test_bad_arguments(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_ood_sets_for_fashion_mnist() -> None:
    sets = ds.ood_sets("fashion-mnist", n=30, seed=4)
    assert list(sets) == ["digits", "photos", "gaussian", "uniform"]
    for data in sets.values():
        assert_sample(data[0])
        assert data[len(data) - 1][1] == -1
    assert [len(s) for s in sets.values()] == [1797, 30, 30, 30]


def test_ood_sets_for_digits(isolated: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(ds.ood_sets("digits", n=5)) == ["photos", "gaussian", "uniform"]
    write_fake_fmnist(isolated / "fm")
    monkeypatch.setenv(ds.FASHION_MNIST_ENV, str(isolated / "fm"))
    sets = ds.ood_sets("digits", n=5)
    assert list(sets) == ["fashion-mnist", "photos", "gaussian", "uniform"]
    assert len(sets["fashion-mnist"]) == 10 and sets["fashion-mnist"][9][1] == -1


@pytest.mark.parametrize(
    "make",
    [
        lambda: ds.DigitsOOD(),
        lambda: ds.DigitsID("val"),
        lambda: ds.NoiseOOD("uniform", n=4),
        lambda: ds.SamplePhotoCrops(n=4),
    ],
)
def test_access_does_not_modify_stored_images(make) -> None:
    data = make()
    before = data.data.clone()
    first = data[1][0]
    data.tensors()
    assert torch.equal(data[1][0], first) and torch.equal(data.data, before)
    assert torch.equal(make().data, before)  # the shared caches are untouched too
