"""Images from directories: labelled ``ImageFolder`` trees, loose image files, their transforms."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from oodunleash.cli._errors import UsageError

__all__ = [
    "LooseImages",
    "image_transform",
    "labelled_folder",
    "loader",
    "loose_images",
    "parse_named_dir",
    "preprocessing",
]

#: The preprocessing entries a checkpoint records (what ``save_pretrained`` accepts).
RECORDED_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def preprocessing(
    model: nn.Module,
    *,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """timm's data config for ``model`` (its recorded preprocessing, or its architecture's
    defaults), with the command line's overrides, made to the channels the model reads."""
    from timm.data import resolve_data_config

    from oodunleash.cli._preprocessing import input_channels, match_channels

    channels = input_channels(model)
    overrides: dict[str, Any] = {"img_size": img_size, "crop_pct": crop_pct}
    overrides["interpolation"] = interpolation
    for flag, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if len(values) not in {1, channels or 3}:
            raise UsageError(
                f"--{flag} takes 1 or {channels or 3} numbers (one per channel), got {len(values)}."
            )
        overrides[flag] = tuple(values) * ((channels or 3) // len(values))
    if std is not None and any(s <= 0 for s in std):
        raise UsageError(f"--std must be positive, got {list(std)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if channels is not None:
        overrides["in_chans"] = channels
    return match_channels(resolve_data_config(overrides, model=model), channels)


def image_transform(config: Mapping[str, Any]) -> Callable[[Any], Tensor]:
    """The evaluation transform of a timm data config: to the config's channels (grayscale or
    RGB), resize, centre crop, normalise."""
    from oodunleash.decision import image_transform as recorded_transform

    return recorded_transform(config)


def _check_dir(path: str | os.PathLike[str], flag: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"{flag} {path}: no such directory.")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: not a directory.")
    return folder


def labelled_folder(path: str | os.PathLike[str], flag: str) -> Any:
    """A torchvision ``ImageFolder`` (one sub-folder per class), checked at the boundary.

    Its ``transform`` is set later, once the model (sized by the classes found) gives it."""
    from torchvision.datasets import ImageFolder

    folder = _check_dir(path, flag)
    if not any(folder.iterdir()):
        raise UsageError(
            f"{flag} {path}: the directory is empty; it must hold one sub-folder "
            "of images per class."
        )
    try:
        return ImageFolder(str(folder), loader=read_rgb)
    except FileNotFoundError as exc:
        # ImageFolder's own words ("Couldn't find any class folder", "Found no valid file").
        raise UsageError(
            f"{flag} {path}: {exc} It must hold one sub-folder of images per class."
        ) from None


class LooseImages(Dataset):
    """Image files, each read as RGB and transformed; items are image tensors (no labels).

    Args:
        paths: The image files, in the order the items come.
        transform: Applied to each PIL image.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(read_rgb(self.paths[index]))


class UnreadableImageError(UsageError):
    """An image file that PIL cannot decode (bad input: exit code 2)."""


def read_rgb(path: str | os.PathLike[str]) -> Any:
    """The image at ``path`` as an RGB PIL image; a file PIL cannot read is named in the error."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:  # PIL's UnidentifiedImageError, truncated files
        raise UnreadableImageError(
            f"Cannot read the image {path} ({exc}): remove or replace it."
        ) from None


def _is_image(path: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


def loose_images(
    paths: Sequence[str | os.PathLike[str]], transform: Callable, flag: str
) -> LooseImages:
    """Every image under ``paths`` (files, or folders searched recursively, so class
    sub-folders are optional), sorted per folder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image(p))
            if not found:
                raise UsageError(
                    f"{flag} {given}: no images in this directory (looked for "
                    f"{', '.join(IMG_EXTENSIONS)} files, sub-folders included)."
                )
            files += found
        elif path.is_file():
            if not _is_image(path):
                raise UsageError(
                    f"{flag} {given}: not an image file ({', '.join(IMG_EXTENSIONS)})."
                )
            files.append(path)
        else:
            raise UsageError(f"{flag} {given}: no such file or directory.")
    return LooseImages(files, transform)


def parse_named_dir(text: str) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)`` (the argparse type of ``--ood-dir``)."""
    import argparse

    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. svhn=data/svhn), got {text!r}.")
    return name.strip(), folder.strip()


def loader(dataset: Dataset, batch_size: int, workers: int, *, shuffle: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` in file order unless ``shuffle``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=False,
    )
