"""Calibration on held-out ID images, and per-image in-or-out decisions with a guaranteed
false-alarm rate (see :mod:`oodunleash.decision.conformal` for the guarantee)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from oodunleash.decision.conformal import (
    benjamini_hochberg,
    check_alpha,
    conformal_p_values,
    conformal_threshold,
    min_calibration_size,
)
from oodunleash.decision.inputs import NO_PREPROCESSING, ImageInput, as_batches, image_transform

__all__ = [
    "Calibration",
    "NotCalibratedError",
    "Prediction",
    "calibrate",
    "predict",
    "score_inputs",
]


class NotCalibratedError(ValueError, AttributeError):
    """Raised by :meth:`~oodunleash.OODUnleash.predict` before
    :meth:`~oodunleash.OODUnleash.calibrate`."""


@dataclass
class Calibration:
    """The default score's values on held-out ID images (sorted, float64), and which score.

    Attributes:
        scores: The calibration scores, ascending.
        score: The score's label (registry name).
        score_config: Its options (``get_config()``), so a changed score is noticed.
    """

    scores: Tensor
    score: str
    score_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.scores).detach().to("cpu", torch.float64).reshape(-1)
        if values.numel() == 0:
            raise ValueError("A calibration needs at least one score.")
        if torch.isnan(values).any():
            raise ValueError(
                f"The {self.score!r} score gave NaN on some calibration images; a p-value "
                "needs comparable scores. Check the images and the model."
            )
        self.scores = values.sort().values

    @property
    def n(self) -> int:
        """The number of calibration images."""
        return int(self.scores.numel())

    def check_alpha(self, alpha: float) -> float:
        """``alpha``, after refusing one this calibration cannot reach (the smallest p-value
        is ``1 / (n + 1)``)."""
        alpha = check_alpha(alpha)
        needed = min_calibration_size(alpha)
        if self.n < needed:
            raise ValueError(
                f"alpha={alpha:g} needs at least {needed} calibration images (the smallest "
                f"p-value with n of them is 1/(n+1)); this wrapper was calibrated on {self.n}, "
                f"whose smallest p-value is {1 / (self.n + 1):.3g}, so nothing could ever be "
                "flagged. Calibrate on more held-out ID images, or ask for a larger alpha."
            )
        return alpha

    def p_values(self, scores: Tensor) -> Tensor:
        """Conformal p-values of ``scores`` (float64, CPU)."""
        return conformal_p_values(self.scores, scores)

    def threshold(self, alpha: float) -> float:
        """The score below which an image is flagged at level ``alpha`` (without FDR)."""
        return conformal_threshold(self.scores, self.check_alpha(alpha))


@dataclass
class Prediction:
    """What :meth:`~oodunleash.OODUnleash.predict` returns, one entry per image.

    Attributes:
        labels: The classifier's predicted classes (``int64``).
        scores: The OOD scores (higher = more in-distribution).
        p_values: Conformal p-values (float64): the share of calibration scores at or below
            each score, counted as ``(1 + #) / (n + 1)``.
        is_ood: ``p_values <= alpha``, or Benjamini-Hochberg's rejections with ``fdr=True``.
        alpha: The level asked for.
        fdr: Whether ``is_ood`` controls the false-discovery rate over this batch.
        score: The score's name.
        threshold: Without ``fdr``: images scoring below it are flagged; ``None`` with ``fdr``.
    """

    labels: Tensor
    scores: Tensor
    p_values: Tensor
    is_ood: Tensor
    alpha: float
    fdr: bool
    score: str
    threshold: float | None

    def __len__(self) -> int:
        return int(self.scores.numel())

    def __repr__(self) -> str:
        mode = "FDR" if self.fdr else "per image"
        return (
            f"Prediction({len(self)} images, {int(self.is_ood.sum())} flagged OOD at "
            f"alpha={self.alpha:g} ({mode}), score={self.score!r})"
        )


def _transform_of(unleashed: Any) -> Callable[[], Callable]:
    def make() -> Callable:
        preprocessing = getattr(unleashed, "preprocessing", None)
        if not preprocessing:
            raise ValueError(NO_PREPROCESSING)
        return image_transform(preprocessing)

    return make


def _default_score(unleashed: Any, score: Any = None) -> tuple[str, Any]:
    """The label and instance of ``score`` (default: the wrapper's), fitted one reused."""
    evaluator = unleashed._evaluator
    label, instance = next(iter(evaluator._instances(score or unleashed.default_score).items()))
    evaluator._check_ready({label: instance})
    return label, instance


def _score_batch(evaluator: Any, x: Tensor, label: str, instance: Any) -> tuple[Tensor, Tensor]:
    from oodunleash.features.feature_set import check_score_output
    from oodunleash.runtime.modules import eval_mode, model_device

    x = x.to(model_device(evaluator.model))
    with eval_mode(evaluator.model), torch.no_grad():
        data = evaluator.feature_extractor(x, maps="feature_maps" in instance.requires)
        data.images = x
        out = check_score_output(label, instance.score(data), x.shape[0])
    return out.detach().float().cpu(), data.logits.argmax(dim=1).cpu()


def _score_all(
    unleashed: Any, x: ImageInput, score: Any, batch_size: int, progress: bool, desc: str
) -> tuple[str, Any, Tensor, Tensor]:
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    label, instance = _default_score(unleashed, score)
    batches = as_batches(x, _transform_of(unleashed), batch_size)
    scores, labels = [], []
    for batch in tqdm(batches.batches, total=batches.total, desc=desc, disable=not progress):
        values, predicted = _score_batch(unleashed._evaluator, batch, label, instance)
        scores.append(values)
        labels.append(predicted)
    if not scores:
        raise ValueError("No images: the loader gave no batches.")
    return label, instance, torch.cat(scores), torch.cat(labels)


def score_inputs(
    unleashed: Any,
    x: ImageInput,
    score: Any = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """Scores of every image in ``x`` (any kind :func:`~.inputs.as_batches` takes), on CPU."""
    return _score_all(unleashed, x, score, batch_size, progress, "score")[2]


def calibrate(
    unleashed: Any,
    loader: ImageInput,
    *,
    alpha: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Calibration:
    """The default score on held-out ID images, as a :class:`Calibration`; ``alpha`` (when
    given) is checked against their number at once.

    A fitted score's state is first put in the form a checkpoint stores it (KNN: a float16
    bank of at most ``max_saved`` rows), so a saved and reloaded wrapper scores, and decides,
    exactly as this one."""
    _, fitted = _default_score(unleashed)
    if fitted.needs_fit and fitted.state_keys:
        fitted.load_state_dict(fitted.state_dict())
    label, instance, scores, _ = _score_all(
        unleashed, loader, None, batch_size, progress, "calibrate"
    )
    calibration = Calibration(scores, label, dict(instance.get_config()))
    if alpha is not None:
        calibration.check_alpha(alpha)
    return calibration


def check_calibration(unleashed: Any) -> Calibration:
    """The wrapper's calibration, after checking it was made with today's default score."""
    calibration = getattr(unleashed, "calibration_", None)
    if calibration is None:
        raise NotCalibratedError(
            "This OODUnleash instance is not calibrated: call .calibrate(loader) with held-out "
            "ID images (not the ones it was fitted, or its score chosen, on) before predict()."
        )
    label, instance = _default_score(unleashed)
    config = dict(instance.get_config())
    if (label, _comparable(config)) != (calibration.score, _comparable(calibration.score_config)):
        raise NotCalibratedError(
            f"The calibration was made with the {calibration.score!r} score "
            f"({calibration.score_config}), but the default score is now {label!r} ({config}): "
            "call .calibrate(loader) again."
        )
    return calibration


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists and may turn 1.0 into 1; compare what survives a round trip.
    def norm(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [norm(v) for v in value]
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        return value

    return {k: norm(v) for k, v in config.items()}


def predict(
    unleashed: Any,
    x: ImageInput,
    *,
    alpha: float = 0.05,
    fdr: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> Prediction:
    """Labels, scores, p-values and in-or-out decisions for every image in ``x``."""
    calibration = check_calibration(unleashed)
    alpha = calibration.check_alpha(alpha)
    label, _, scores, labels = _score_all(unleashed, x, None, batch_size, progress, "predict")
    p_values = calibration.p_values(scores)
    if fdr:
        is_ood, threshold = benjamini_hochberg(p_values, alpha), None
    else:
        is_ood, threshold = p_values <= alpha, calibration.threshold(alpha)
    return Prediction(labels, scores, p_values, is_ood, alpha, bool(fdr), label, threshold)
