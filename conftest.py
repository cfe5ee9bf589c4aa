"""Set-up of the docstring examples (``pytest --doctest-modules oodunleash``), written once.

* **The names every example may use without importing them**: ``torch``, ``nn``, ``F``,
  ``DataLoader``, ``TensorDataset`` and ``OODUnleash`` (``doctest_namespace``). An example of a
  public function still shows the imports a reader needs to copy it; these spare the examples of
  internal helpers the same lines again and again.
* **A fresh session per example**: seeded with ``torch.manual_seed(0)``, only the built-in OOD
  scores registered, torch single-threaded while it runs (the thread count is put back after it,
  for the tests that run in the same process). The documentation pages start each page the same
  way (``docs/conftest.py``); both use :mod:`tests.helpers.session`.
"""

from __future__ import annotations

import pytest

from tests.helpers.session import example_threads, fresh_start


@pytest.fixture(scope="session")
def doctest_namespace() -> dict:
    """Overrides pytest's own (empty) namespace of the docstring examples."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from oodunleash import OODUnleash

    return {
        "torch": torch,
        "nn": nn,
        "F": F,
        "DataLoader": DataLoader,
        "TensorDataset": TensorDataset,
        "OODUnleash": OODUnleash,
    }


@pytest.fixture(autouse=True)
def _fresh_example(request: pytest.FixtureRequest):
    """Each docstring example starts as a new Python session would."""
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(example_threads())
    fresh_start()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
