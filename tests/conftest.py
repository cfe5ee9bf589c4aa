"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

# --- Fashion-MNIST availability (oodunleash.bench.datasets) ---------------------------------------

#: Set to 1 (e.g. in CI that installs dataset-fashion-mnist) to turn "data missing" skips into
#: failures, so a broken data setup cannot hide behind skipped tests.
REQUIRE_FASHION_MNIST_ENV = "OODUNLEASH_REQUIRE_FASHION_MNIST"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
    """Directory of the real Fashion-MNIST IDX files.

    Skips the test when the data is missing, or fails it when ``OODUNLEASH_REQUIRE_FASHION_MNIST=1``.
    Use it as an argument, or as a marker: ``@pytest.mark.usefixtures("fashion_mnist_dir")``.
    """
    # Imported here so that collecting unrelated tests never depends on this module.
    from oodunleash.bench.datasets import find_fashion_mnist

    path = find_fashion_mnist()
    if path is None:
        message = (
            "Fashion-MNIST not found (apt-get install -y dataset-fashion-mnist, or set "
            "OODUNLEASH_FASHION_MNIST to a directory holding the IDX files)"
        )
        if os.environ.get(REQUIRE_FASHION_MNIST_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_FASHION_MNIST_ENV}=1 requires it.")
        pytest.skip(message)
    return path
