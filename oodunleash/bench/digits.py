"""scikit-learn's 8x8 handwritten digits in the benchmark's 1x28x28 format: a far-OOD set for
Fashion-MNIST (:class:`DigitsOOD`), and an in-distribution stand-in for machines without
Fashion-MNIST (:class:`DigitsID`, :func:`digits_near_ood_split`). No download needed."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from oodunleash.bench import images
from oodunleash.bench.images import ImageTensorDataset

__all__ = ["DIGIT_CLASSES", "DigitsID", "DigitsOOD", "digits_near_ood_split"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


@functools.lru_cache(maxsize=1)
def _digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    # 20x20 inside a 4-pixel border mirrors how MNIST-style digits sit in a 28x28 frame.
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    framed = F.pad(big.clamp_(0.0, 1.0), (4, 4, 4, 4)).squeeze(1)
    return framed, torch.as_tensor(digits.target, dtype=torch.int64)


class DigitsOOD(ImageTensorDataset):
    """scikit-learn's 1,797 handwritten digits as a far-OOD set for Fashion-MNIST.

    The 8x8 images (values 0..16) are scaled to [0, 1], upsampled to 20x20 (bilinear) and
    padded to 28x28, then normalised like Fashion-MNIST. Every label is -1.

    Args:
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> image, label = DigitsOOD()[0]
        >>> tuple(image.shape), label
        ((1, 28, 28), -1)
    """

    def __init__(self, normalize: bool = True) -> None:
        pixels, labels = _digits_28()
        super().__init__(pixels, torch.full_like(labels, -1), normalize)


class DigitsID(ImageTensorDataset):
    """scikit-learn's digits as a 10-class in-distribution dataset in the 1x28x28 format.

    Meant for demos where Fashion-MNIST is missing. The 1,797 images are partitioned per
    class, deterministically given ``seed``: ``test_fraction`` of each class is the test
    split, and ``val_fraction`` of the remainder the validation split. The test split does
    not depend on ``val_fraction`` or ``classes``. Images are prepared as in
    :class:`DigitsOOD`.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        classes: Optional subset of digits; labels are re-mapped to ``0..len(classes) - 1`` in
            the order given.
        val_fraction: Fraction of the non-test images of each class used for validation, in
            [0, 1).
        test_fraction: Fraction of each class used for testing, in (0, 1).
        seed: Seed of the partition.
        normalize: Normalise with the Fashion-MNIST mean and std.
        ood_label: If given, every item gets this label instead.

    Attributes:
        data, targets, source_indices, classes, class_names: As in :class:`FashionMNIST`.

    Example:
        >>> train = DigitsID("train", classes=(0, 1, 2))
        >>> train.class_names, sorted(set(train.targets.tolist()))
        (('0', '1', '2'), [0, 1, 2])
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        classes: Sequence[int] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        seed: int = 0,
        normalize: bool = True,
        *,
        ood_label: int | None = None,
    ) -> None:
        images.check_split(split, ("train", "val", "test"))
        images.check_fraction("val_fraction", val_fraction)
        images.check_fraction("test_fraction", test_fraction, allow_zero=False)
        kept_classes = tuple(range(10)) if classes is None else images.check_classes(classes, 10)
        pixels, labels = _digits_28()
        labels_np = labels.numpy()
        rest, test = images.stratified_holdout(labels_np, test_fraction, seed, stage=1)
        train_pos, val_pos = images.stratified_holdout(labels_np[rest], val_fraction, seed, stage=2)
        rows_np = {"train": rest[train_pos], "val": rest[val_pos], "test": test}[split]
        rows_np = rows_np[np.isin(labels_np[rows_np], kept_classes)]
        rows = torch.from_numpy(rows_np)
        targets = images.remap_labels(labels[rows], kept_classes, 10)
        if ood_label is not None:
            targets = torch.full_like(targets, int(ood_label))
        super().__init__(
            pixels[rows], targets, normalize, tuple(DIGIT_CLASSES[c] for c in kept_classes)
        )
        self.split = split
        self.classes = kept_classes
        self.source_indices = rows


def digits_near_ood_split(
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    seed: int = 0,
    *,
    normalize: bool = True,
) -> dict[str, DigitsID]:
    """Near-OOD protocol on scikit-learn's digits, shaped like :func:`near_ood_split`.

    Args:
        id_classes: In-distribution digits; the others are held back as OOD.
        val_fraction: Fraction of the ID training part held out for validation, in [0, 1).
        test_fraction: Fraction of each digit used for testing, in (0, 1).
        seed: Seed of the partition.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Returns:
        ``"train"``, ``"val"``, ``"test"`` (ID) and ``"ood"`` (test-part images of the
        held-back digits, labelled -1).

    Example:
        >>> splits = digits_near_ood_split((0, 1, 2, 3, 4, 5))
        >>> sorted(splits), splits["ood"][0][1]
        (['ood', 'test', 'train', 'val'], -1)
    """
    ids = images.check_classes(id_classes, 10)
    ood_classes = tuple(c for c in range(10) if c not in ids)
    if not ood_classes:
        raise ValueError("id_classes uses all 10 digits; hold at least one back as OOD.")
    common = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "normalize": normalize,
    }
    return {
        "train": DigitsID("train", ids, **common),
        "val": DigitsID("val", ids, **common),
        "test": DigitsID("test", ids, **common),
        "ood": DigitsID("test", ood_classes, ood_label=-1, **common),
    }
