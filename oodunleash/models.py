"""Deprecated: the reference models moved to :mod:`oodunleash.bench.models` (this alias goes in
the next release)."""

import warnings

from .bench.models import MODEL_NAMES, SmallCNN, create_model

warnings.warn(
    "oodunleash.models is deprecated: import from oodunleash.bench.models instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["MODEL_NAMES", "SmallCNN", "create_model"]
