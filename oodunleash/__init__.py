"""oodunleash: give any image classifier back its out-of-distribution detection ability.

Implements Unleashing Mask (Zhu et al., ICML 2023): UM fine-tunes the weights and UMAP learns a
pruning mask, both with the flooding objective ``|CE − ξ| + ξ`` around a loss constraint ξ.
"""

from . import metrics
from .checkpoint import HubError
from .config import Masked, Relative, UnleashConfig
from .constraint import estimate_loss_constraint, mean_cross_entropy
from .masking import LayerMasks, select_layers, topk_mask
from .proxy import proxy_ood
from .results import EvaluationResults
from .scores import OODScore, get_score, list_scores, register_score
from .training import (
    LossConstraintTooHighError,
    TrainConfig,
    TrainingDivergedError,
    flooding_loss,
)
from .tuning import TuneResult, tune
from .wrapper import NotFittedError, OODUnleash

__version__ = "0.1.0"

__all__ = [
    "LayerMasks",
    "LossConstraintTooHighError",
    "Masked",
    "NotFittedError",
    "OODUnleash",
    "Relative",
    "TrainConfig",
    "TrainingDivergedError",
    "UnleashConfig",
    "__version__",
    "estimate_loss_constraint",
    "flooding_loss",
    "mean_cross_entropy",
    "select_layers",
    "topk_mask",
    "EvaluationResults",
    "HubError",
    "OODScore",
    "get_score",
    "list_scores",
    "metrics",
    "register_score",
    "TuneResult",
    "proxy_ood",
    "tune",
]
