"""What a checkpoint holds besides the weights: the wrapper's parameters and fitted state."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from oodunleash.finetune.loop import TrainConfig
from oodunleash.masks.layer_masks import LayerMasks

__all__ = ["LoadedCheckpoint", "WrapperState"]


@dataclass
class WrapperState:
    """An :class:`~oodunleash.OODUnleash`'s part of a checkpoint, passed explicitly.

    Attributes:
        params: The wrapper's constructor arguments (``get_params()``), JSON-able.
        layer_names: The resolved names of the masked layers.
        fitted: Whether ``fit`` ran (``False`` for a post-hoc-only wrapper).
        loss_constraint, history, train_config, masks: ``fit``'s results (``loss_constraint_``,
            ``history_``, ``train_config_``, ``masks_``). Loaded masks come back detached:
            attach them once the model is wrapped.
        fitted_scores: ``fitted_scores_``.
        results: ``last_results_`` (an ``EvaluationResults``) or ``None``.
        class_names: Names of the classes in logit order, or ``None``.
        preprocessing: The data config the model was trained with (``preprocessing``), or
            ``None`` when unknown.
        calibration: The conformal calibration (``calibration_``), or ``None``.
    """

    params: dict[str, Any]
    layer_names: list[str]
    fitted: bool = True
    loss_constraint: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    train_config: TrainConfig | None = None
    masks: LayerMasks | None = None
    fitted_scores: dict[str, Any] = field(default_factory=dict)
    results: Any = None
    class_names: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    calibration: Any = None

    @classmethod
    def of(cls, unleashed: Any, class_names: list[str] | None = None) -> WrapperState:
        """The state of ``unleashed`` (an :class:`~oodunleash.OODUnleash`) to save;
        ``class_names`` overrides the ones it carries."""
        fitted = unleashed.is_fitted
        return cls(
            params=unleashed.get_params(),
            layer_names=list(unleashed.layer_names),
            fitted=fitted,
            loss_constraint=unleashed.loss_constraint_ if fitted else None,
            history=list(unleashed.history_) if fitted else [],
            train_config=getattr(unleashed, "train_config_", None) if fitted else None,
            masks=unleashed.masks_,
            fitted_scores=dict(unleashed.fitted_scores_),
            results=unleashed.last_results_,
            class_names=class_names or getattr(unleashed, "class_names", None),
            preprocessing=getattr(unleashed, "preprocessing", None),
            calibration=getattr(unleashed, "calibration_", None),
        )

    def restore(self, unleashed: Any) -> None:
        """Give a freshly built ``OODUnleash(model, **self.params)`` this fitted state (the
        loaded masks are attached to its model)."""
        if self.fitted:
            unleashed.loss_constraint_ = self.loss_constraint
            unleashed.history_ = self.history
            if self.train_config is not None:
                unleashed.train_config_ = self.train_config
        unleashed.masks_ = None if self.masks is None else self.masks.attach()
        unleashed.fitted_scores_ = self.fitted_scores
        unleashed.last_results_ = self.results
        if self.class_names is not None:
            unleashed.class_names = self.class_names
        if self.preprocessing:
            unleashed.preprocessing = self.preprocessing
        unleashed.calibration_ = self.calibration


@dataclass
class LoadedCheckpoint:
    """What :func:`~oodunleash.checkpoint.load_checkpoint` returns: the model with its weights,
    the wrapper's state (``OODUnleash(model, **state.params)`` rebuilds it), the config, and
    where it came from (for messages)."""

    model: nn.Module
    state: WrapperState
    config: dict[str, Any]
    where: str = ""

    def refused_params(self, error: Exception) -> Exception:
        """The error to raise when the wrapper refuses the recorded ``params``."""
        from oodunleash.checkpoint.errors import CorruptCheckpointError
        from oodunleash.checkpoint.format import CONFIG_NAME

        return CorruptCheckpointError(
            f"{CONFIG_NAME} in {self.where}: field 'params' holds constructor arguments this "
            f"OODUnleash refuses ({error}). The file was altered, or written by a version with "
            "other arguments: save the checkpoint again."
        )


def train_config_from_json(data: dict[str, Any] | None) -> TrainConfig | None:
    """The recorded ``TrainConfig`` (callables were recorded by name and come back as that
    name), or ``None`` with a warning when this version cannot rebuild it."""
    if data is None:
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if isinstance(kwargs.get("energy_margins"), list):
        kwargs["energy_margins"] = tuple(kwargs["energy_margins"])
    try:
        return TrainConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        warnings.warn(f"The recorded training configuration was not restored: {exc}", stacklevel=4)
        return None


def results_from_json(data: dict[str, Any] | None) -> Any:
    from oodunleash.evaluation.results import EvaluationResults

    if data is None:
        return None
    try:
        return EvaluationResults.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        warnings.warn(f"The stored evaluation results could not be read: {exc!r}.", stacklevel=4)
        return None
