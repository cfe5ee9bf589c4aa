"""Proxy OOD sets built from in-distribution validation images, for choosing without OOD data.

Most users have no OOD data to choose a detector on. :func:`proxy_ood` builds outliers from
the validation images themselves, following the synthetic validation outliers of Hendrycks,
Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure" (ICLR 2019): noise,
blurred noise, mixtures of two images, jigsaw-shuffled patches, inverted images. Each family
probes another way an input can leave the training distribution (see :data:`FAMILIES`).

No single family stands in for real OOD data: Mondal et al., "Tuning OOD Detectors Without
Given OOD Data" (2026), show that the choice of tuning set changes which detector ranks
first. :func:`oodunleash.tune` therefore averages its metrics over several families, so no
one family decides alone.

Every family is drawn in the images' own (normalised) space with statistics measured on the
validation images (per-channel mean, standard deviation, minimum and maximum), so a detector
cannot reject a proxy by its value range alone. The sets are deterministic given ``seed`` and
the order in which the loader yields its images (use an unshuffled validation loader).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from oodunleash.runtime.batches import split_batch

__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "proxy_images", "proxy_ood"]


class _Stats:
    """Per-channel statistics of the ID images, shaped to broadcast over ``(N, C, ...)``."""

    def __init__(self, images: Tensor) -> None:
        dims = [0, *range(2, images.dim())]
        shape = (1, images.shape[1], *([1] * (images.dim() - 2)))
        self.mean = images.mean(dim=dims).view(shape)
        self.std = images.std(dim=dims).view(shape)
        self.low = images.amin(dim=dims).view(shape)
        self.high = images.amax(dim=dims).view(shape)


def _gaussian(images: Tensor, stats: _Stats, gen: torch.Generator) -> Tensor:
    noise = torch.randn(images.shape, generator=gen) * stats.std + stats.mean
    return torch.maximum(torch.minimum(noise, stats.high), stats.low)


def _uniform(images: Tensor, stats: _Stats, gen: torch.Generator) -> Tensor:
    return stats.low + torch.rand(images.shape, generator=gen) * (stats.high - stats.low)


def _blurred_noise(images: Tensor, stats: _Stats, gen: torch.Generator) -> Tensor:
    noise = torch.randn(images.shape, generator=gen)
    side = max(3, (min(images.shape[-2:]) // 7) | 1)  # odd kernel, about 1/7 of the image
    kernel = torch.ones(images.shape[1], 1, side, side) / side**2
    blurred = F.conv2d(noise, kernel, padding=side // 2, groups=images.shape[1])
    # Rescale the smoothed field back to the images' spread: blobs, not a flat grey.
    blurred = (blurred - blurred.mean()) / blurred.std().clamp_min(1e-12)
    blobs = blurred * stats.std + stats.mean
    return torch.maximum(torch.minimum(blobs, stats.high), stats.low)


def _blend(images: Tensor, stats: _Stats, gen: torch.Generator) -> Tensor:
    # Pair every image with another one (a random derangement), then average the two.
    shift = int(torch.randint(1, max(2, len(images)), (1,), generator=gen))
    order = torch.randperm(len(images), generator=gen)
    partner = torch.empty_like(order)
    partner[order] = order.roll(shift)
    return (images + images[partner]) / 2


def _jigsaw(images: Tensor, stats: _Stats, gen: torch.Generator, grid: int = 4) -> Tensor:
    n, c, h, w = images.shape
    grid = min(grid, h, w)  # images smaller than 4x4: one pixel per patch
    ph, pw = h // grid, w // grid
    core = images[:, :, : ph * grid, : pw * grid]
    patches = core.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, grid * grid, c, ph, pw)
    # One permutation per image; a derangement-free shuffle may leave a few patches in place,
    # but never all of them (likely with few patches): an unshuffled one is rolled by one.
    perm = torch.argsort(torch.rand(n, grid * grid, generator=gen), dim=1)
    unmoved = (perm == torch.arange(grid * grid)).all(dim=1)
    perm[unmoved] = perm[unmoved].roll(1, dims=1)
    shuffled = torch.gather(patches, 1, perm[:, :, None, None, None].expand_as(patches))
    shuffled = shuffled.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    out = images.clone()
    out[:, :, : ph * grid, : pw * grid] = shuffled.reshape(n, c, ph * grid, pw * grid)
    return out


def _inverted(images: Tensor, stats: _Stats, gen: torch.Generator) -> Tensor:
    return stats.high + stats.low - images


#: The families :func:`proxy_ood` can build: ``name -> (function, needs spatial images,
#: why)``. The reason is what the family tests a detector on.
FAMILIES: dict[str, tuple[Callable[[Tensor, _Stats, torch.Generator], Tensor], bool, str]] = {
    "gaussian": (
        _gaussian,
        False,
        "Gaussian noise with the images' per-channel mean and spread: no structure at all, "
        "the easiest far-OOD case; a detector that fails it is broken.",
    ),
    "uniform": (
        _uniform,
        False,
        "Uniform noise over the images' value range: flat spectrum, extreme pixel values.",
    ),
    "blurred_noise": (
        _blurred_noise,
        True,
        "Gaussian noise smoothed with a box filter into blobs: low-frequency structure that "
        "white-noise checks miss (Hendrycks et al.'s blurred noise and blobs).",
    ),
    "blend": (
        _blend,
        False,
        "The arithmetic mean of two validation images: ID statistics and textures with no "
        "single class, the nearest of the proxies to near-OOD.",
    ),
    "jigsaw": (
        _jigsaw,
        True,
        "Each image cut into a 4x4 grid of patches shuffled: local ID texture, broken global "
        "shape; tests whether a detector looks beyond local statistics.",
    ),
    "inverted": (
        _inverted,
        False,
        "Intensities reflected within the images' range (dark becomes bright): familiar shapes "
        "with unfamiliar contrast.",
    ),
}

#: The families built when none are named: all of :data:`FAMILIES`.
DEFAULT_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def _family_generator(seed: int, family: str) -> torch.Generator:
    # Each family has its own stream, so adding or dropping one leaves the others unchanged.
    # (The CPU generator keeps only 32 bits of its seed: hash seed and family together.)
    return torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}/{family}".encode()))


def _gather_images(loader: Iterable, limit: int) -> Tensor:
    parts: list[Tensor] = []
    count = 0
    for batch in loader:
        images, _ = split_batch(batch, need_labels=False)
        parts.append(images.detach().to("cpu", torch.float32))
        count += len(images)
        if count >= limit:
            break
    if not parts:
        raise ValueError("val_loader yielded no batches: proxy OOD needs validation images.")
    return torch.cat(parts)[:limit]


def proxy_images(
    images: Tensor,
    families: Sequence[str] | None = None,
    *,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Proxy OOD images built from ``images`` (``(N, C, ...)`` floats), one tensor per family.

    Args:
        images: In-distribution images, as the model sees them (normalised).
        families: Names from :data:`FAMILIES` (default: all of them; on images that are not
            ``(N, C, H, W)`` the spatial ones, ``blurred_noise`` and ``jigsaw``, are left out).
        seed: Seeds every family; the result is deterministic given ``images`` and ``seed``.

    Returns:
        ``{family: tensor}``, each the shape and dtype of ``images``.

    Example:
        >>> x = torch.rand(8, 1, 12, 12)
        >>> proxies = proxy_images(x, seed=0)
        >>> sorted(proxies) == sorted(FAMILIES)
        True
        >>> proxies["jigsaw"].shape, proxies["jigsaw"].dtype
        (torch.Size([8, 1, 12, 12]), torch.float32)
        >>> torch.equal(proxies["blend"], proxy_images(x, ["blend"], seed=0)["blend"])
        True
    """
    if not isinstance(images, Tensor) or images.dim() < 2 or len(images) < 2:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, ...) tensor with N >= 2, got {got}.")
    spatial = images.dim() == 4
    if spatial and min(images.shape[-2:]) < 2:
        if families is not None and "jigsaw" in families:
            raise ValueError(
                f"'jigsaw' shuffles patches of the images, and images of "
                f"{images.shape[-2]}x{images.shape[-1]} pixels have none to shuffle: the proxies "
                "would be the ID images. Leave 'jigsaw' out of families."
            )
        spatial_ok = [f for f in DEFAULT_FAMILIES if f != "jigsaw"]
    else:
        spatial_ok = list(DEFAULT_FAMILIES)
    if families is None:
        families = [f for f in spatial_ok if spatial or not FAMILIES[f][1]]
    if isinstance(families, str):
        families = [families]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown proxy families {unknown}; choose from {list(FAMILIES)}.")
    if not families:
        raise ValueError(f"families is empty: name at least one of {list(FAMILIES)}.")
    flat = [f for f in families if FAMILIES[f][1] and not spatial]
    if flat:
        raise ValueError(
            f"The families {flat} need (N, C, H, W) images, got shape {tuple(images.shape)}. "
            "Leave them out of families."
        )
    dtype = images.dtype
    work = images.detach().to("cpu", torch.float32)
    finite = torch.isfinite(work).flatten(1).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"{len(bad)} of {len(work)} validation images hold NaN or infinite pixels (images "
            f"{bad[:5]}{'...' if len(bad) > 5 else ''}): every proxy built from their statistics "
            "would be NaN. Clean or drop those images first."
        )
    stats = _Stats(work)
    return {
        name: FAMILIES[name][0](work, stats, _family_generator(seed, name)).to(dtype)
        for name in families
    }


def proxy_ood(
    val_loader: Iterable,
    families: Sequence[str] | None = None,
    *,
    n: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, DataLoader]:
    """Named loaders of proxy outliers built from the ID validation images.

    Reads up to ``n`` images from ``val_loader`` (its first batches), builds each family of
    :data:`FAMILIES` from them with :func:`proxy_images`, and wraps each in a ``DataLoader``
    that yields image batches. Use them wherever OOD loaders are expected, e.g.
    ``unleashed.evaluate(val_loader, proxy_ood(val_loader))``; :func:`oodunleash.tune` builds
    them when it is given no OOD data.

    Args:
        val_loader: ID validation data, yielding images or ``(images, labels)`` batches. Use an
            unshuffled loader: the proxies are deterministic given ``seed`` and its order.
        families: Family names (default: all that fit the images' shape).
        n: Number of validation images read, hence the size of each proxy set.
        seed: Seed of the random draws.
        batch_size: Batch size of the returned loaders (default: the validation loader's, or
            128).

    Returns:
        ``{family: DataLoader}``, in the order of ``families``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> val = DataLoader(TensorDataset(torch.randn(40, 1, 8, 8), torch.zeros(40).long()),
        ...                  batch_size=16)
        >>> proxies = proxy_ood(val, ["gaussian", "jigsaw"], n=32)
        >>> {name: len(loader.dataset) for name, loader in proxies.items()}
        {'gaussian': 32, 'jigsaw': 32}
        >>> next(iter(proxies["jigsaw"]))[0].shape
        torch.Size([16, 1, 8, 8])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer of at least 2, got {n!r}.")
    images = _gather_images(val_loader, n)
    sets = proxy_images(images, families, seed=seed)
    size = batch_size or getattr(val_loader, "batch_size", None) or 128
    return {name: DataLoader(TensorDataset(x), batch_size=size) for name, x in sets.items()}
