"""From scores to decisions: conformal calibration and in-or-out predictions with a guaranteed
false-alarm rate, on the inputs users hold.

:meth:`OODUnleash.calibrate <oodunleash.OODUnleash.calibrate>` keeps the default score's
values on held-out ID images; :meth:`~oodunleash.OODUnleash.predict` turns a new image's score
into a conformal p-value, the share of calibration scores at or below it, and flags it as OOD
when ``p <= alpha``. On ID images exchangeable with the calibration images, at most a share
``alpha`` is flagged (on average over calibration sets); nothing is promised about OOD images.

Example:
    >>> import torch
    >>> calibration = Calibration(torch.arange(1.0, 100.0), "energy")  # 99 ID scores
    >>> calibration.p_values(torch.tensor([0.0, 49.5])).tolist()
    [0.01, 0.5]
    >>> calibration.threshold(0.05)  # flagged below the 5th smallest calibration score
    5.0
"""

from oodunleash.decision.calibration import (
    Calibration,
    NotCalibratedError,
    Prediction,
    calibrate,
    predict,
    score_inputs,
)
from oodunleash.decision.conformal import (
    benjamini_hochberg,
    check_alpha,
    conformal_p_values,
    conformal_threshold,
    min_calibration_size,
)
from oodunleash.decision.inputs import (
    ImageInput,
    as_batches,
    image_transform,
    preprocessing_attribute,
    read_image,
)

__all__ = [
    "Calibration",
    "ImageInput",
    "NotCalibratedError",
    "Prediction",
    "as_batches",
    "benjamini_hochberg",
    "calibrate",
    "check_alpha",
    "conformal_p_values",
    "conformal_threshold",
    "image_transform",
    "min_calibration_size",
    "predict",
    "preprocessing_attribute",
    "read_image",
    "score_inputs",
]
