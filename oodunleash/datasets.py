"""Deprecated: the data sets moved to :mod:`oodunleash.bench.datasets` (this alias goes in the
next release)."""

import warnings

from .bench.datasets import *  # noqa: F403
from .bench.datasets import __all__  # noqa: F401

warnings.warn(
    "oodunleash.datasets is deprecated: import from oodunleash.bench.datasets instead.",
    DeprecationWarning,
    stacklevel=2,
)
