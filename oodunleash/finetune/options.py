"""What a fine-tune is told and what it raises: :class:`TrainConfig` (optimizer, schedule,
speed and divergence options) and the errors of :mod:`~oodunleash.finetune.loop`.

Kept below every other fine-tune module, so each can read the options without importing the
loop that runs them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from oodunleash.finetune.recipes import METHOD_DEFAULTS, real_number

__all__ = [
    "TRAINING_OPTIONS",
    "check_grad_norm",
    "train_config",
    "training_options",
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

    What ``OODUnleash.fit(training={...})`` sets (every field but ``epochs`` and ``lr``):

    - ``optimizer``: ``"sgd"`` (momentum 0.9, Nesterov), ``"adam"``, ``"adamw"`` or a callable
      ``params -> Optimizer``; ``momentum``; ``weight_decay`` (default 5e-4); ``schedule``;
      ``max_grad_norm``: clip gradients to this norm.
    - ``freeze_norm_stats``: keep BatchNorm running statistics fixed (UMAP otherwise moves them
      although the weights are frozen); ``train_norms``: UMAP also trains the scale and shift of
      the normalisation layers with the scores (default: on when there are any; ones you froze
      stay frozen; the reference freezes every weight, ``False``; UM refuses ``True``).
    - ``outlier_loss``: ``"oe"`` (weight 0.5) or ``"energy"`` (Energy-OE, margins −25/−7,
      weight 0.1), default ``"oe"`` with an outlier loader; ``outlier_weight``.

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


#: What ``fit(training=...)`` may set: every :class:`TrainConfig` field but the two ``fit`` takes
#: itself (``epochs``, ``lr``).
TRAINING_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("epochs", "lr")
)


def training_options(training: Any) -> dict[str, Any]:
    """``fit(training=...)`` as a dict of :data:`TRAINING_OPTIONS`, checked before any work.

    Example:
        >>> training_options({"amp": True})
        {'amp': True}
        >>> training_options({"lr": 0.1})
        Traceback (most recent call last):
        ...
        ValueError: training has no option 'lr': fit(loader, epochs, lr) takes it directly.
    """
    if training is None:
        return {}
    if not isinstance(training, Mapping):
        raise TypeError(
            f"training must be a dict of fine-tune options (e.g. {{'amp': True}}), got "
            f"{type(training).__name__}. Options: {', '.join(TRAINING_OPTIONS)}."
        )
    options = dict(training)
    for key in options:
        if key in ("epochs", "lr"):
            raise ValueError(
                f"training has no option {key!r}: fit(loader, epochs, lr) takes it directly."
            )
        if key not in TRAINING_OPTIONS:
            close = difflib.get_close_matches(str(key), TRAINING_OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"training has no option {key!r}.{hint} Options: {', '.join(TRAINING_OPTIONS)}."
            )
    return options


def check_grad_norm(value: Any) -> float | None:
    """``max_grad_norm`` as a positive float, or ``None`` (no clipping)."""
    if value is None:
        return None
    try:
        norm = real_number(value, "max_grad_norm")
    except TypeError:
        norm = math.nan
    if not 0 < norm < math.inf:
        raise ValueError(
            f"max_grad_norm must be a positive number (the norm gradients are clipped to), got "
            f"{value!r}: 0 would stop learning and a negative norm reverses the step. Use None "
            "for no clipping."
        )
    return norm


def train_config(method: str, **options: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a fit: ``None`` options take ``method``'s defaults."""
    defaults = METHOD_DEFAULTS[method]
    for key in ("epochs", "lr", "weight_decay"):
        if options.get(key) is None:
            options[key] = defaults[key]
    options["lr"] = real_number(options["lr"], "lr")
    for key in ("weight_decay", "momentum"):
        if options.get(key) is None:
            continue
        value = real_number(options[key], key)
        if not 0 <= value < math.inf:
            raise ValueError(
                f"{key} must be a finite number of at least 0, got {options[key]!r}: a negative "
                f"{key} pushes the weights the wrong way. Use 0 for none"
                + (f" (default {defaults[key]})." if key in defaults else ".")
            )
        options[key] = value
    options["max_grad_norm"] = check_grad_norm(options.get("max_grad_norm"))
    return TrainConfig(**options)
