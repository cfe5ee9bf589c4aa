"""The decision methods of :class:`~oodunleash.OODUnleash`: its recorded preprocessing, and
:meth:`calibrate` / :meth:`predict`, which turn the default score into in-or-out decisions."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import Tensor

from oodunleash.decision.calibration import Prediction, calibrate, check_calibration, predict
from oodunleash.decision.inputs import ImageInput, preprocessing_attribute

__all__ = ["Decisions"]

T = TypeVar("T", bound="Decisions")


class Decisions:
    """Mixed into :class:`~oodunleash.OODUnleash`, which owns ``calibration_``, the evaluator
    and the default score these methods read."""

    calibration_: Any

    preprocessing = preprocessing_attribute()

    @property
    def calibration_scores_(self) -> Tensor:
        """The calibration scores (ascending), after :meth:`calibrate`."""
        return check_calibration(self).scores

    def calibrate(self: T, loader: ImageInput, *, alpha: float | None = None, **options: Any) -> T:
        """Score held-out ID images with the default score and keep the values
        (``calibration_``, saved with the checkpoint) for :meth:`predict`; return ``self``.

        The images must not have been used to fit the model or its scores, nor to choose them:
        the guarantee needs them exchangeable with the ID images ``predict`` will see. ``alpha``
        checks now that there are enough of them (at least ``1/alpha - 1``). ``options``:
        ``batch_size``, ``progress``. ``loader``: any input :meth:`score` takes."""
        self.calibration_ = calibrate(self, loader, alpha=alpha, **options)
        return self

    def predict(
        self, x: ImageInput, alpha: float = 0.05, *, fdr: bool = False, **options: Any
    ) -> Prediction:
        """Classify ``x`` and decide in or out for each image: a
        :class:`~oodunleash.decision.Prediction` (``labels``, ``scores``, ``p_values``,
        ``is_ood``).

        ``is_ood`` is ``p <= alpha``, so that on ID images at most a share ``alpha`` is
        flagged (conformal guarantee, over calibration sets; nothing is promised about OOD
        images). ``fdr=True`` flags by Benjamini-Hochberg over the batch instead: among the
        flagged images, the expected share of ID ones is at most ``alpha``. Needs
        :meth:`calibrate`. ``x``: any input :meth:`score` takes; ``options``: ``batch_size``,
        ``progress``."""
        return predict(self, x, alpha=alpha, fdr=fdr, **options)
