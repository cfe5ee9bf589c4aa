"""Choosing a fine-tune and an OOD score on validation data: :func:`tune`.

* :mod:`~oodunleash.tuning.candidates`: the candidate models and score variants compared;
* :mod:`~oodunleash.tuning.reader`: one candidate read out by every score variant;
* :mod:`~oodunleash.tuning.fusion`: fused scores as candidates, from the cached values;
* :mod:`~oodunleash.tuning.schedule`: screening, cost estimates, the plan said up front;
* :mod:`~oodunleash.tuning.result`: the selection rule and :class:`TuneResult`;
* :mod:`~oodunleash.tuning.search`: :func:`tune` itself.

Proxy OOD sets for validation without OOD data are in :mod:`oodunleash.evaluation.proxy`.
"""

from oodunleash.tuning.candidates import (
    DEFAULT_FINETUNES,
    SCORE_GRID,
    CandidateSpec,
    parse_finetune,
    score_variants,
)
from oodunleash.tuning.result import CandidateResult, TuneResult, select
from oodunleash.tuning.search import tune

__all__ = [
    "DEFAULT_FINETUNES",
    "SCORE_GRID",
    "CandidateResult",
    "CandidateSpec",
    "TuneResult",
    "parse_finetune",
    "score_variants",
    "select",
    "tune",
]
