"""What a fine-tune is told and what it raises: :class:`TrainConfig` (optimizer, schedule,
speed and divergence options) and the errors of :mod:`~oodunleash.finetune.loop`.

Kept below every other fine-tune module, so each can read the options without importing the
loop that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "LossConstraintTooHighError",
    "OptimizerFactory",
    "SchedulerFactory",
    "TrainConfig",
    "TrainingDivergedError",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite, or exploded (see :class:`~oodunleash.finetune.loop.TrainConfig`);
    the weights were restored to the end of the last good epoch."""


class LossConstraintTooHighError(ValueError):
    """ξ is at or above ``ln(num_classes)``, the loss of a uniform guess. Raised before any
    training step, so the model is unchanged; a sweep can catch it and go on."""


@dataclass
class TrainConfig:
    """How the fine-tune runs. Defaults are documented in :meth:`OODUnleash.fit`.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable taking the parameters;
    ``schedule`` is ``"cosine"`` (per step, to zero), ``"constant"`` or a callable
    ``(optimizer, total_steps) -> scheduler`` stepped once per batch.

    ``train_norms``: :func:`train` also trains the scale and shift of ``module``'s
    normalisation layers (:func:`norm_affine_parameters`; parameters with
    ``requires_grad=False`` stay frozen), besides ``params``.

    Speed: ``compile`` runs the forward pass through ``torch.compile`` (``True``, or a dict of
    its keyword arguments such as ``{"mode": "max-autotune"}``; ``{"mode": "reduce-overhead"}``
    adds CUDA graphs on GPUs). A masked model's weights are masked eagerly before each pass and
    enter the compiled graph as inputs, so masks do not split it. ``channels_last`` moves the
    model and the 4-D image batches to that memory format; ``amp`` runs the forward pass in
    float16 on CUDA and bfloat16 on CPU.

    Divergence: the loss is not read on the host after every step (that would be a device
    sync per step); every ``check_every`` steps and at the end of each epoch the losses of
    the steps since the last check are inspected at once. A NaN or infinite loss, or a
    check window in which *every* loss exceeds ``divergence_factor`` x max(first loss,
    ln(classes)) (the loss of a uniform guess), raises :class:`TrainingDivergedError`, at most
    ``check_every`` steps after it began. ``divergence_factor=None`` checks finiteness only.

    Example:
        >>> TrainConfig(epochs=1, outlier_loss="energy").outlier_weight  # Energy-OE default
        0.1
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str | OptimizerFactory = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str | SchedulerFactory = "cosine"
    amp: bool = False
    max_grad_norm: float | None = None
    freeze_norm_stats: bool = False
    train_norms: bool = False
    outlier_loss: Literal["oe", "energy"] | None = None
    outlier_weight: float | None = None
    energy_margins: tuple[float, float] = (-25.0, -7.0)
    compile: bool | dict[str, Any] = False
    channels_last: bool = False
    check_every: int = 20
    divergence_factor: float | None = 1e3

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.outlier_loss not in (None, "oe", "energy"):
            raise ValueError(f"outlier_loss must be 'oe' or 'energy', got {self.outlier_loss!r}.")
        if self.outlier_loss is not None and self.outlier_weight is None:
            # The published defaults: 0.5 for OE, 0.1 for Energy-OE.
            self.outlier_weight = 0.5 if self.outlier_loss == "oe" else 0.1
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(
                f"check_every must be a positive integer (steps between divergence checks), "
                f"got {self.check_every!r}."
            )
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(
                f"divergence_factor must be above 1 (or None), got {self.divergence_factor!r}."
            )
        if not isinstance(self.compile, bool | dict):
            raise TypeError(
                f"compile must be True/False or a dict of torch.compile keyword arguments, "
                f"got {self.compile!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables shown by name)."""
        out = asdict(self)
        for key in ("optimizer", "schedule"):
            if callable(out[key]):
                out[key] = getattr(out[key], "__name__", "custom")
        return out
