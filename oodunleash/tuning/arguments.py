"""Checks on :func:`~oodunleash.tuning.tune`'s arguments, made before any work starts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["check_calibration_loader", "check_options"]


def check_calibration_loader(loader: Any, train_loader: Any, val_loader: Any) -> None:
    """Refuse, before any work, calibration images that tune trains or chooses on."""
    if loader is None:
        return
    for other, what in ((train_loader, "train_loader"), (val_loader, "val_loader")):
        if loader is other:
            raise ValueError(
                f"calibration_loader is {what}: tune fits or chooses on those images, so their "
                "scores are not exchangeable with new ID images and the calibrated false-alarm "
                "rate would not hold. Hold out other ID images for calibration_loader."
            )
    if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
        raise TypeError(
            "calibration_loader must be a DataLoader or a list of image batches (it is read "
            f"once tune has chosen), got {type(loader).__name__}."
        )


def check_options(max_accuracy_drop: float, time_budget: float | None, fusion: int = 0) -> None:
    """``max_accuracy_drop`` (points, at least 0), ``time_budget`` (positive seconds) and
    ``fusion`` (a number of score families, at least 0)."""
    if isinstance(fusion, bool) or not isinstance(fusion, int) or fusion < 0:
        raise ValueError(
            f"fusion must be a whole number of score families to combine (0: no fused "
            f"scores, 3: the default), got {fusion!r}."
        )
    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, int | float):
        raise TypeError(f"max_accuracy_drop must be a number of points, got {max_accuracy_drop!r}.")
    if not max_accuracy_drop >= 0:
        raise ValueError(f"max_accuracy_drop must be >= 0 points, got {max_accuracy_drop}.")
    if time_budget is not None and not (
        isinstance(time_budget, int | float)
        and not isinstance(time_budget, bool)
        and time_budget > 0
    ):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}.")
