"""Deprecated: the demo moved to :mod:`oodunleash.bench.demo` (this alias goes in the next
release)."""

import warnings

from .bench.demo import DEMO_SCORES, run_demo

warnings.warn(
    "oodunleash.demo is deprecated: import from oodunleash.bench.demo instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["DEMO_SCORES", "run_demo"]
