"""From scores to numbers: OOD metrics (AUROC, FPR@95, AUPR), the results table and its plots,
the evaluation of a model with many scores in one pass, and proxy OOD sets made from ID images.

- :mod:`~oodunleash.evaluation.metrics`: the metrics, from one sort of the scores.
- :mod:`~oodunleash.evaluation.results`: :class:`EvaluationResults` (tables, JSON, plots).
- :mod:`~oodunleash.evaluation.evaluator`: :class:`Evaluator`, scores fitted and read.
- :mod:`~oodunleash.evaluation.proxy`: :func:`proxy_ood`, outliers built from ID images.
"""

from oodunleash.evaluation import metrics
from oodunleash.evaluation.evaluator import Evaluator
from oodunleash.evaluation.proxy import proxy_ood
from oodunleash.evaluation.results import EvaluationResults

__all__ = ["EvaluationResults", "Evaluator", "metrics", "proxy_ood"]
