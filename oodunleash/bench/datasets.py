"""Image data sets for the out-of-distribution benchmark, in one place.

Everything here yields ``(image, label)`` pairs where ``image`` is a ``float32`` tensor of
shape ``(1, 28, 28)`` and ``label`` a Python ``int``, all normalised alike (see
:mod:`oodunleash.bench.images`).

In-distribution data:

* :class:`FashionMNIST` (read with torchvision; see :func:`find_fashion_mnist` for where the
  files are looked for) and :func:`near_ood_split`, which holds some classes back as near-OOD
  data.
* :class:`DigitsID` and :func:`digits_near_ood_split`: scikit-learn's 8x8 digits in the same
  format, for demos on machines without Fashion-MNIST.

Far-OOD data shipped with the dependencies (no download needed): :class:`DigitsOOD`,
:class:`SamplePhotoCrops` and :class:`NoiseOOD`, gathered by :func:`ood_sets`, and
:class:`GlyphsOOD` (rendered letters, for outlier exposure).

Example:
    >>> sorted(ood_sets("fashion-mnist", n=10))
    ['digits', 'gaussian', 'photos', 'uniform']
"""

from __future__ import annotations

import os
from typing import Literal

from torch.utils.data import Dataset

from oodunleash.bench.digits import DIGIT_CLASSES, DigitsID, DigitsOOD, digits_near_ood_split
from oodunleash.bench.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FashionMNIST,
    default_cache_dir,
    download_fashion_mnist,
    fashion_mnist_available,
    find_fashion_mnist,
    load_fashion_mnist,
    near_ood_split,
)
from oodunleash.bench.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Sample
from oodunleash.bench.synthetic import (
    GLYPH_CHARACTERS,
    GLYPH_FONTS,
    GlyphsOOD,
    NoiseOOD,
    SamplePhotoCrops,
)

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "GLYPH_CHARACTERS",
    "GLYPH_FONTS",
    "DigitsID",
    "DigitsOOD",
    "FashionMNIST",
    "GlyphsOOD",
    "NoiseOOD",
    "SamplePhotoCrops",
    "default_cache_dir",
    "digits_near_ood_split",
    "download_fashion_mnist",
    "fashion_mnist_available",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "near_ood_split",
    "ood_sets",
]


def ood_sets(
    kind: Literal["fashion-mnist", "digits"] = "fashion-mnist",
    *,
    n: int = 2000,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    normalize: bool = True,
) -> dict[str, Dataset[Sample]]:
    """The shipped far-OOD sets suited to an in-distribution dataset.

    For Fashion-MNIST as ID data: ``"digits"`` (:class:`DigitsOOD`), ``"photos"``
    (:class:`SamplePhotoCrops`), ``"gaussian"`` and ``"uniform"`` (:class:`NoiseOOD`).

    For digits as ID data: ``"fashion-mnist"`` (the Fashion-MNIST test set, labelled -1; only
    if the files are found or ``download`` is set), then ``"photos"``, ``"gaussian"`` and
    ``"uniform"``.

    Args:
        kind: The in-distribution data, ``"fashion-mnist"`` or ``"digits"``.
        n: Size of the generated sets (photos and noise).
        seed: Seed of the generated sets.
        root: Where to look for Fashion-MNIST (digits ID only).
        download: Download Fashion-MNIST if missing (digits ID only).
        normalize: Normalise with the Fashion-MNIST mean and std.

    Returns:
        Name to dataset, each yielding ``(float32 (1, 28, 28), -1)``.

    Example:
        >>> sets = ood_sets("fashion-mnist", n=100)
        >>> {name: len(ds) for name, ds in sets.items()}
        {'digits': 1797, 'photos': 100, 'gaussian': 100, 'uniform': 100}
    """
    sets: dict[str, Dataset[Sample]] = {}
    if kind == "fashion-mnist":
        sets["digits"] = DigitsOOD(normalize)
    elif kind == "digits":
        if download or find_fashion_mnist(root) is not None:
            sets["fashion-mnist"] = FashionMNIST(
                "test", root=root, download=download, normalize=normalize, ood_label=-1
            )
    else:
        raise ValueError(f"Unknown in-distribution kind {kind!r}; use 'fashion-mnist' or 'digits'.")
    sets["photos"] = SamplePhotoCrops(n, seed, normalize)
    sets["gaussian"] = NoiseOOD("gaussian", n, seed, normalize)
    sets["uniform"] = NoiseOOD("uniform", n, seed, normalize)
    return sets
