"""The forgetting fine-tune behind :meth:`OODUnleash.fit <oodunleash.OODUnleash.fit>`.

- :mod:`~oodunleash.finetune.options`: :class:`TrainConfig` and the errors a fine-tune raises.
- :mod:`~oodunleash.finetune.constraint`: ξ, the loss constraint, and its recipes.
- :mod:`~oodunleash.finetune.losses`: the flooding objective and outlier-exposure losses.
- :mod:`~oodunleash.finetune.step` and :mod:`~oodunleash.finetune.loop`: one training step, the
  epochs around it; :mod:`~oodunleash.finetune.divergence`: the check that a run has not
  diverged.
- :mod:`~oodunleash.finetune.fitting`: a whole UM / UMAP fit from checked inputs.
- :mod:`~oodunleash.finetune.rollback` and :mod:`~oodunleash.finetune.resume`: all-or-nothing
  fits, and resuming one from its per-epoch state.
"""

from oodunleash.finetune.constraint import estimate_loss_constraint, mean_cross_entropy
from oodunleash.finetune.losses import flooding_loss
from oodunleash.finetune.options import (
    LossConstraintTooHighError,
    TrainConfig,
    TrainingDivergedError,
)

__all__ = [
    "LossConstraintTooHighError",
    "TrainConfig",
    "TrainingDivergedError",
    "estimate_loss_constraint",
    "flooding_loss",
    "mean_cross_entropy",
]
