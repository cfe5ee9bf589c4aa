"""Deprecated: the benchmark moved to :mod:`oodunleash.bench` (this alias goes in the next
release)."""

import warnings

from .bench.grid import (
    REFERENCE_KEEP_RATIO,
    FineTune,
    Setting,
    default_grid,
    parse_finetune,
    xi_candidates,
    xi_value,
)
from .bench.protocol import (
    ALL_SCORES,
    TensorLoader,
    evaluate_model,
    in_batches,
    load_benchmark_data,
    subsample,
    train_classifier,
)
from .bench.report import select_configs, summarize, tradeoff
from .bench.run import load_checkpoint, run_benchmark, run_seed, save_checkpoint

warnings.warn(
    "oodunleash.benchmark is deprecated: import from oodunleash.bench (grid, protocol, run, "
    "report) instead.",
    DeprecationWarning,
    stacklevel=2,
)

#: Deprecated: the control is now ``fit(flooding=False)`` (``FineTune(method, xi=None)``).
CONTROL_XI = 1e-12

__all__ = [
    "ALL_SCORES",
    "CONTROL_XI",
    "REFERENCE_KEEP_RATIO",
    "FineTune",
    "Setting",
    "TensorLoader",
    "default_grid",
    "evaluate_model",
    "in_batches",
    "load_benchmark_data",
    "load_checkpoint",
    "parse_finetune",
    "run_benchmark",
    "run_seed",
    "save_checkpoint",
    "select_configs",
    "subsample",
    "summarize",
    "tradeoff",
    "train_classifier",
    "xi_candidates",
    "xi_value",
]
