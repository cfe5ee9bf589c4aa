"""The image format every benchmark data set shares, and the argument checks they all use.

Every set yields ``(image, label)`` pairs where ``image`` is a ``float32`` tensor of shape
``(1, 28, 28)`` and ``label`` a Python ``int``. All sets share one normalisation (the
Fashion-MNIST mean and standard deviation), so in-distribution and OOD images go through
exactly the same preprocessing and a detector cannot tell them apart by scale alone.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IMAGE_SIDE", "ImageTensorDataset", "Sample"]

#: Mean and standard deviation of Fashion-MNIST pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.286
FASHION_MNIST_STD = 0.353
#: Height and width of every image.
IMAGE_SIDE = 28

Sample = tuple[torch.Tensor, int]


class ImageTensorDataset(Dataset[Sample]):
    """Images held as one ``(N, 28, 28)`` tensor, normalised on access.

    Args:
        data: ``uint8`` in 0..255 or floating point in [0, 1].
        targets: ``int64`` labels.
        normalize: Normalise with the Fashion-MNIST mean and std.
        class_names: Names of the classes, in label order.
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        normalize: bool,
        class_names: tuple[str, ...] = (),
    ) -> None:
        self.data = data
        self.targets = targets
        self.normalize = normalize
        self.class_names = class_names
        # Fold "to [0, 1]" and normalisation into one multiply-add per item.
        scale = 1.0 / 255.0 if data.dtype == torch.uint8 else 1.0
        if normalize:
            self._scale = scale / FASHION_MNIST_STD
            self._shift = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
        else:
            self._scale, self._shift = scale, 0.0

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> Sample:
        # Out-of-place on purpose: for float data `.to` returns the stored tensor itself.
        image = self.data[index].to(torch.float32) * self._scale + self._shift
        return image.unsqueeze(0), int(self.targets[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset at once, as the items would be.

        Returns:
            ``(images, labels)``: ``float32`` ``(N, 1, 28, 28)`` and ``int64`` ``(N,)``.
        """
        images = self.data.to(torch.float32) * self._scale + self._shift
        return images.unsqueeze(1), self.targets.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, normalize={self.normalize})"


def check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> None:
    """Refuse a split name that is not one of ``allowed``."""
    if split not in allowed:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(map(repr, allowed))}.")


def check_classes(classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """``classes`` as a tuple of distinct integers in ``0..num_classes - 1``."""
    if isinstance(classes, (str, bytes)):
        raise TypeError(f"classes must be a sequence of class indices, got {classes!r}.")
    try:
        # operator.index rejects floats such as 2.5 instead of silently truncating them.
        result = tuple(operator.index(c) for c in classes)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"classes must be a sequence of integers, got {classes!r}.") from exc
    if not result:
        raise ValueError("classes is empty; give at least one class index.")
    bad = [c for c in result if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"Class indices {bad} out of range; valid indices are 0..{num_classes - 1}."
        )
    if len(set(result)) != len(result):
        raise ValueError(f"classes {result} contains duplicates.")
    return result


def check_fraction(name: str, value: float, allow_zero: bool = True) -> float:
    """``value`` if it lies in [0, 1) (or (0, 1) without ``allow_zero``)."""
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return float(value)


def check_size(n: int) -> None:
    """Refuse a negative number of generated images."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}.")


def remap_labels(labels: torch.Tensor, kept: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """Labels of the ``kept`` classes renumbered ``0..len(kept) - 1`` in the order given,
    -1 for the others."""
    lookup = torch.full((num_classes,), -1, dtype=torch.int64)
    lookup[list(kept)] = torch.arange(len(kept))
    return lookup[labels]


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int, stage: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row numbers into (kept, held out), holding out ``fraction`` of every class.

    Each class gets its own random stream, so a class's held-out rows do not depend on which
    other classes are present.
    """
    kept, held = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, stage, int(c)])
        rows = rows[rng.permutation(len(rows))]
        n_held = int(np.floor(len(rows) * fraction + 0.5))
        held.append(rows[:n_held])
        kept.append(rows[n_held:])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(kept)) if kept else empty,
        np.sort(np.concatenate(held)) if held else empty,
    )
