"""The Fashion-MNIST benchmark and the demo: an application of the library, not part of it.

``import oodunleash`` does not import this package; import it (or its modules) when needed:

* :mod:`~oodunleash.bench.datasets`: Fashion-MNIST (read with torchvision), scikit-learn
  digits, and the far-OOD sets that ship with the dependencies.
* :mod:`~oodunleash.bench.models`: the small reference classifiers.
* :mod:`~oodunleash.bench.protocol`: the benchmark's data, scores and from-scratch training.
* :mod:`~oodunleash.bench.grid`: settings, ξ recipes and fine-tunes as typed dataclasses.
* :mod:`~oodunleash.bench.run`: each (setting, seed) as stages over a :class:`RunRecord`.
* :mod:`~oodunleash.bench.report` and :mod:`~oodunleash.bench.plots`: the summary.
* :mod:`~oodunleash.bench.demo`: ``oodunleash demo``.
"""

from __future__ import annotations

from oodunleash.bench.demo import run_demo
from oodunleash.bench.grid import (
    FineTune,
    MaskedLoss,
    Setting,
    TrainLossMultiple,
    UmapMask,
    default_grid,
)
from oodunleash.bench.models import SmallCNN, create_model
from oodunleash.bench.report import select_configs, summarize
from oodunleash.bench.run import RunRecord, run_benchmark, run_seed

__all__ = [
    "FineTune",
    "MaskedLoss",
    "RunRecord",
    "Setting",
    "SmallCNN",
    "TrainLossMultiple",
    "UmapMask",
    "create_model",
    "default_grid",
    "run_benchmark",
    "run_demo",
    "run_seed",
    "select_configs",
    "summarize",
]
