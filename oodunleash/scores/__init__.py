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
* :mod:`~oodunleash.scores.scaling`: ``scale``
* :mod:`~oodunleash.scores.neighbors`: ``nnguide``
* :mod:`~oodunleash.scores.boundary`: ``fdbd``
* :mod:`~oodunleash.scores.collapse`: ``nci``
* :mod:`~oodunleash.scores.weiper`: ``weiper``
* :mod:`~oodunleash.scores.fusion`: ``fused`` (members normalised on ID data, averaged) and
  :func:`fuse` for values already computed

Scores that declare a hyperparameter grid for ``tune`` are listed by :func:`score_grids`.

Example:
    >>> import torch
    >>> from oodunleash.scores import get_score, list_scores
    >>> from oodunleash.features.collect import FeatureSet
    >>> len(list_scores()) >= 15
    True
    >>> get_score("energy").score(FeatureSet(logits=torch.zeros(2, 4)))
    tensor([1.3863, 1.3863])
"""

from oodunleash.features.collect import FeatureSet, LinearHead
from oodunleash.scores import (
    activation,
    boundary,
    collapse,
    distance,
    fusion,
    gradient,
    logits,
    neighbors,
    scaling,
    subspace,
    weiper,
)
from oodunleash.scores.activation import ASHB, ASHP, ASHS, DICE, ReAct
from oodunleash.scores.base import (
    REQUIREMENTS,
    OODScore,
    ScoreNotFittedError,
    get_score,
    list_scores,
    register_score,
    score_grids,
    unregister_score,
)
from oodunleash.scores.boundary import FDBD
from oodunleash.scores.collapse import NCI
from oodunleash.scores.distance import KNN, SHE, Mahalanobis, RelativeMahalanobis
from oodunleash.scores.fusion import Fused, fuse
from oodunleash.scores.gradient import ODIN, GradNorm
from oodunleash.scores.logits import GEN, MSP, Energy, Entropy, MaxLogit
from oodunleash.scores.neighbors import NNGuide
from oodunleash.scores.resolve import resolve_score, resolve_scores
from oodunleash.scores.scaling import SCALE
from oodunleash.scores.spec import ScoreSpec
from oodunleash.scores.subspace import Residual, ViM
from oodunleash.scores.weiper import WeiPer

__all__ = [
    "ASHB",
    "ASHP",
    "ASHS",
    "DICE",
    "FDBD",
    "GEN",
    "KNN",
    "MSP",
    "NCI",
    "ODIN",
    "REQUIREMENTS",
    "SCALE",
    "SHE",
    "Energy",
    "Entropy",
    "FeatureSet",
    "Fused",
    "GradNorm",
    "LinearHead",
    "Mahalanobis",
    "MaxLogit",
    "NNGuide",
    "OODScore",
    "ReAct",
    "RelativeMahalanobis",
    "Residual",
    "ScoreNotFittedError",
    "ScoreSpec",
    "ViM",
    "WeiPer",
    "activation",
    "boundary",
    "collapse",
    "distance",
    "fuse",
    "fusion",
    "get_score",
    "gradient",
    "list_scores",
    "logits",
    "neighbors",
    "register_score",
    "resolve_score",
    "resolve_scores",
    "scaling",
    "score_grids",
    "subspace",
    "unregister_score",
    "weiper",
]
