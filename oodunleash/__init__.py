"""oodunleash: give any image classifier back its out-of-distribution detection ability.

Implements Unleashing Mask (Zhu et al., ICML 2023): UM fine-tunes the weights and UMAP learns a
pruning mask, both with the flooding objective ``|CE − ξ| + ξ`` around a loss constraint ξ.
"""

from oodunleash._version import __version__
from oodunleash.checkpoint import HubError
from oodunleash.config import Masked, Relative, UnleashConfig
from oodunleash.evaluation import EvaluationResults, metrics, proxy_ood
from oodunleash.finetune import (
    LossConstraintTooHighError,
    TrainConfig,
    TrainingDivergedError,
    estimate_loss_constraint,
    flooding_loss,
    mean_cross_entropy,
)
from oodunleash.masks import LayerMasks, select_layers, topk_mask
from oodunleash.scores import OODScore, get_score, list_scores, register_score
from oodunleash.tuning import TuneResult, tune
from oodunleash.wrapper import NotFittedError, OODUnleash

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
