"""Far-OOD sets generated from what the dependencies ship (no download): grayscale crops of
scikit-learn's two sample photos, Gaussian and uniform noise, and rendered letters and symbols
(:class:`GlyphsOOD`, auxiliary outliers for outlier exposure)."""

from __future__ import annotations

import functools
import pathlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from oodunleash.bench.images import IMAGE_SIDE, ImageTensorDataset, check_size

__all__ = ["GLYPH_CHARACTERS", "GLYPH_FONTS", "GlyphsOOD", "NoiseOOD", "SamplePhotoCrops"]


@functools.lru_cache(maxsize=1)
def _gray_photos() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    weights = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    return tuple(
        (torch.from_numpy(np.asarray(img, dtype=np.float32)) @ weights).div_(255.0)
        for img in load_sample_images().images
    )


class SamplePhotoCrops(ImageTensorDataset):
    """Grayscale 28x28 crops of scikit-learn's two sample photos, as a far-OOD set.

    Each crop picks a photo, a square size between ``min_size`` and ``max_size`` pixels and a
    position at random, and is resized to 28x28 (bilinear, antialiased). Labels are -1.

    Args:
        n: Number of crops.
        seed: Seed; the crops are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.
        min_size: Smallest crop side in pixels of the photo.
        max_size: Largest crop side (at most the photos' height, 427).

    Example:
        >>> crops = SamplePhotoCrops(n=10, seed=1)
        >>> len(crops), tuple(crops[0][0].shape)
        (10, (1, 28, 28))
    """

    def __init__(
        self,
        n: int = 2000,
        seed: int = 0,
        normalize: bool = True,
        min_size: int = 28,
        max_size: int = 160,
    ) -> None:
        check_size(n)
        photos = _gray_photos()
        limit = min(min(p.shape) for p in photos)
        if not 1 <= min_size <= max_size <= limit:
            raise ValueError(
                f"Need 1 <= min_size <= max_size <= {limit}, got min_size={min_size}, "
                f"max_size={max_size}."
            )
        rng = np.random.default_rng(seed)
        crops = torch.empty((n, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.float32)
        for i in range(n):
            photo = photos[int(rng.integers(len(photos)))]
            size = int(rng.integers(min_size, max_size + 1))
            top = int(rng.integers(photo.shape[0] - size + 1))
            left = int(rng.integers(photo.shape[1] - size + 1))
            patch = photo[top : top + size, left : left + size][None, None]
            crops[i] = F.interpolate(
                patch,
                size=(IMAGE_SIDE, IMAGE_SIDE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0, 0]
        super().__init__(crops.clamp_(0.0, 1.0), torch.full((n,), -1), normalize)


class NoiseOOD(ImageTensorDataset):
    """Synthetic noise images as a far-OOD set.

    Pixels are drawn in image space [0, 1] and then normalised like Fashion-MNIST.

    Args:
        kind: ``"gaussian"`` (mean 0.5, std 0.25, clipped to [0, 1]) or ``"uniform"``.
        n: Number of images.
        seed: Seed; the images are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> noise = NoiseOOD("uniform", n=4)
        >>> len(noise), noise[0][1]
        (4, -1)
    """

    def __init__(
        self,
        kind: Literal["gaussian", "uniform"] = "gaussian",
        n: int = 2000,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        check_size(n)
        generator = torch.Generator().manual_seed(seed)
        shape = (n, IMAGE_SIDE, IMAGE_SIDE)
        if kind == "gaussian":
            images = torch.randn(shape, generator=generator).mul_(0.25).add_(0.5).clamp_(0, 1)
        elif kind == "uniform":
            images = torch.rand(shape, generator=generator)
        else:
            raise ValueError(f"Unknown noise kind {kind!r}; use 'gaussian' or 'uniform'.")
        super().__init__(images, torch.full((n,), -1), normalize)
        self.kind = kind


#: Characters :class:`GlyphsOOD` draws: capital letters and a few symbols, no digits.
GLYPH_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ&@#%?$"
#: The matplotlib-bundled fonts :class:`GlyphsOOD` draws with (files in ``mpl-data/fonts/ttf``).
GLYPH_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@functools.cache
def _glyph_outline(char: str, font: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and codes of ``char`` in ``font``, centred on the origin, height 1."""
    import matplotlib
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    fname = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font
    path = TextPath((0, 0), char, size=1.0, prop=FontProperties(fname=str(fname)))
    vertices = np.asarray(path.vertices, dtype=np.float64)
    lo, hi = vertices.min(0), vertices.max(0)
    vertices = (vertices - (lo + hi) / 2) / max(float(hi[1] - lo[1]), 1e-6)
    return vertices, np.asarray(path.codes)


class GlyphsOOD(ImageTensorDataset):
    """Rendered letters and symbols: auxiliary outliers for outlier exposure.

    Each image is one character of :data:`GLYPH_CHARACTERS` (capital letters A-Z and
    ``&@#%?$``, no digits) in one of matplotlib's bundled DejaVu fonts (:data:`GLYPH_FONTS`:
    Sans, Serif and Mono in several weights and slants), at a random height (50-95% of the
    image), rotation (±30°), horizontal stretch, position and brightness, drawn bright on
    black like Fashion-MNIST and rasterised with 4x4 supersampling. The set is disjoint from
    every benchmark OOD set (Fashion-MNIST classes, scikit-learn digits, photo crops, noise),
    so training against it and testing on those sets does not leak test data. Needs
    matplotlib (no download, no display).

    Args:
        n: Number of images.
        seed: Seed; the images are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> glyphs = GlyphsOOD(n=8)
        >>> image, label = glyphs[0]
        >>> image.shape, label
        (torch.Size([1, 28, 28]), -1)
    """

    def __init__(self, n: int = 2000, seed: int = 0, normalize: bool = True) -> None:
        check_size(n)
        from matplotlib.path import Path

        sub = 4
        side = IMAGE_SIDE * sub
        # Pixel-centre coordinates of the supersampled grid, y pointing up.
        coords = (np.arange(side) + 0.5) / sub
        xx, yy = np.meshgrid(coords, IMAGE_SIDE - coords)
        grid = np.stack([xx.ravel(), yy.ravel()], axis=1)
        rng = np.random.default_rng(seed)
        images = torch.empty((n, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.float32)
        for i in range(n):
            char = GLYPH_CHARACTERS[int(rng.integers(len(GLYPH_CHARACTERS)))]
            font = GLYPH_FONTS[int(rng.integers(len(GLYPH_FONTS)))]
            vertices, codes = _glyph_outline(char, font)
            height = rng.uniform(0.5, 0.95) * IMAGE_SIDE
            stretch = rng.uniform(0.8, 1.25)
            angle = np.deg2rad(rng.uniform(-30.0, 30.0))
            cos, sin = np.cos(angle), np.sin(angle)
            scaled = vertices * height * np.array([stretch, 1.0])
            rotated = scaled @ np.array([[cos, sin], [-sin, cos]])
            lo, hi = rotated.min(0), rotated.max(0)
            # Random position that keeps the glyph inside the image where it fits.
            centre = np.array(
                [
                    rng.uniform(
                        min(-lo[d], IMAGE_SIDE / 2), max(IMAGE_SIDE - hi[d], IMAGE_SIDE / 2)
                    )
                    for d in range(2)
                ]
            )
            # Even-odd fill over the closed contours, so counters (O, B, @) stay open.
            # Only points in the glyph's bounding box are tested.
            box = np.all((grid >= lo + centre) & (grid <= hi + centre), axis=1)
            points = grid[box]
            hits = np.zeros(len(points), dtype=bool)
            for contour in Path(rotated + centre, codes).to_polygons(closed_only=True):
                hits ^= Path(contour).contains_points(points)
            inside = np.zeros(len(grid), dtype=bool)
            inside[box] = hits
            mask = torch.from_numpy(inside.reshape(side, side).astype(np.float32))
            coverage = F.avg_pool2d(mask[None, None], sub)[0, 0]
            images[i] = coverage * float(rng.uniform(0.6, 1.0))
        super().__init__(images.clamp_(0.0, 1.0), torch.full((n,), -1), normalize)
