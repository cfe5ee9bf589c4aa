"""Pluggable OOD scores. **Convention: higher score = more in-distribution.**

Each score is an :class:`OODScore`: a ``name``, what it ``requires`` from the model (logits,
penultimate features, feature maps, gradients, class labels, last-layer weights), an optional
``fit`` on ID training data and ``score(data) -> Tensor`` with one value per sample.

Built in (one module per family):

* :mod:`~oodunleash.scores.logits`: ``msp``, ``maxlogit``, ``energy``, ``entropy``, ``gen``
* :mod:`~oodunleash.scores.gradient`: ``odin``, ``gradnorm``
* :mod:`~oodunleash.scores.distance`: ``mahalanobis``, ``relative_mahalanobis``, ``knn``,
  ``she``
* :mod:`~oodunleash.scores.activation`: ``react``, ``ash_p``, ``ash_b``, ``ash_s``, ``dice``
* :mod:`~oodunleash.scores.subspace`: ``vim``, ``residual``

Example:
    >>> import torch
    >>> from oodunleash.scores import get_score, list_scores
    >>> from oodunleash.features import FeatureSet
    >>> len(list_scores()) >= 15
    True
    >>> get_score("energy").score(FeatureSet(logits=torch.zeros(2, 4)))
    tensor([1.3863, 1.3863])
"""

from ..features import FeatureSet, LinearHead
from . import activation, distance, gradient, logits, subspace
from .activation import ASHB, ASHP, ASHS, DICE, ReAct
from .base import (
    REQUIREMENTS,
    OODScore,
    ScoreNotFittedError,
    get_score,
    list_scores,
    register_score,
    resolve_score,
    unregister_score,
)
from .distance import KNN, SHE, Mahalanobis, RelativeMahalanobis
from .gradient import ODIN, GradNorm
from .logits import GEN, MSP, Energy, Entropy, MaxLogit
from .spec import ScoreSpec
from .subspace import Residual, ViM

__all__ = [
    "ASHB",
    "ASHP",
    "ASHS",
    "DICE",
    "GEN",
    "KNN",
    "MSP",
    "ODIN",
    "REQUIREMENTS",
    "SHE",
    "Energy",
    "Entropy",
    "FeatureSet",
    "GradNorm",
    "LinearHead",
    "Mahalanobis",
    "MaxLogit",
    "OODScore",
    "ReAct",
    "RelativeMahalanobis",
    "Residual",
    "ScoreNotFittedError",
    "ScoreSpec",
    "ViM",
    "activation",
    "distance",
    "get_score",
    "gradient",
    "list_scores",
    "logits",
    "register_score",
    "resolve_score",
    "subspace",
    "unregister_score",
]
