"""Fixtures of the data-set tests."""

from __future__ import annotations

import pathlib

import pytest
from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

from oodunleash.bench import datasets as ds
from oodunleash.bench import fashion_mnist as fm


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """No env var, no Debian copy, an empty cache: nothing is found unless a test adds it."""
    monkeypatch.delenv(ds.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    # A stray download=True must never reach the real server from the tests.
    monkeypatch.setattr(
        TorchvisionFashionMNIST, "mirrors", [(tmp_path / "no-server").as_uri() + "/"]
    )
    return tmp_path
