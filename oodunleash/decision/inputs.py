"""The inputs users hold, turned into batches of preprocessed image tensors.

Accepted: a 4-D batch, one 3-D image tensor, a path or a list of paths, a PIL image or a list
of them, and a ``DataLoader`` (or any iterable) of batches (tensors or ``(images, labels)``).
Tensors are taken as already preprocessed; paths and PIL images go through the transform of
the model's recorded preprocessing (:func:`image_transform`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PREPROCESSING_KEYS",
    "preprocessing_values",
    "Batches",
    "ImageInput",
    "as_batches",
    "image_transform",
    "preprocessing_attribute",
    "read_image",
]

#: ``save_pretrained``'s arguments that describe the preprocessing.
#: The entries of a timm data config that say how images become tensors.
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
PREPROCESSING_ARGS = ("input_size", "mean", "std", "interpolation", "crop_pct")

#: What :meth:`~oodunleash.OODUnleash.score` and :meth:`~oodunleash.OODUnleash.predict` take.
ImageInput = Any

NO_PREPROCESSING = (
    "This wrapper has no recorded preprocessing, so it cannot turn image files or PIL images "
    "into tensors. Give it the data config the model was trained with, e.g. "
    "unleashed.preprocessing = {'input_size': (3, 32, 32), 'mean': (0.5,), 'std': (0.5,), "
    "'interpolation': 'bilinear', 'crop_pct': 1.0} (or timm.data.resolve_model_data_config("
    "model) for a timm model kept at its pretrained preprocessing), or pass preprocessed "
    "tensors."
)


def read_image(path: str | os.PathLike[str], channels: int = 3) -> Any:
    """The image at ``path`` as a PIL image in mode ``L`` (1 channel) or ``RGB``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except OSError as exc:  # PIL's UnidentifiedImageError, missing or truncated files
        raise ValueError(f"Cannot read the image {os.fspath(path)!r} ({exc}).") from None


def image_transform(preprocessing: Mapping[str, Any]) -> Callable[[Any], Tensor]:
    """timm's evaluation transform (resize, centre crop, to tensor, normalise) for a recorded
    data config; PIL images are first converted to its number of channels (``L`` or ``RGB``).

    Example:
        >>> from PIL import Image
        >>> t = image_transform({"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5]})
        >>> t(Image.new("RGB", (20, 10))).shape
        torch.Size([1, 8, 8])
    """
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(pretrained_cfg=dict(preprocessing))
    transform = create_transform(**config, is_training=False)
    channels = int(config["input_size"][0])
    mode = "L" if channels == 1 else "RGB"

    def apply(image: Any) -> Tensor:
        return transform(image.convert(mode) if image.mode != mode else image)

    apply.channels = channels  # type: ignore[attr-defined] - paths are read in this mode
    return apply


def preprocessing_values(
    explicit: Mapping[str, Any], data_config: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The preprocessing entries of ``data_config`` with ``explicit`` arguments over them, each
    value checked; ``None`` when neither says anything."""
    merged = {k: v for k, v in (data_config or {}).items() if k in PREPROCESSING_KEYS}
    merged.update({k: v for k, v in explicit.items() if v is not None})
    if not merged:
        return None
    for key in ("input_size", "mean", "std"):
        if key in merged:
            value = merged[key]
            value = [value] if isinstance(value, int | float) else value
            if isinstance(value, str) or not all(isinstance(v, int | float) for v in value):
                raise ValueError(
                    f"{key} must be a number or a sequence of numbers (one per channel), got "
                    f"{merged[key]!r}."
                )
            merged[key] = list(value)
    if "input_size" in merged and len(merged["input_size"]) != 3:
        raise ValueError(
            f"input_size must be (channels, height, width), got {merged['input_size']!r}."
        )
    return merged


def preprocessing_attribute() -> property:
    """The wrapper's ``preprocessing``: a timm data config (only its preprocessing entries are
    kept, checked) stored as ``_preprocessing``, or ``None``."""

    def get(owner: Any) -> dict[str, Any] | None:
        value = owner._preprocessing
        return None if value is None else dict(value)

    def set_(owner: Any, value: Mapping[str, Any] | None) -> None:
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"preprocessing must be a dict (a timm data config), got {value!r}.")
        owner._preprocessing = None if value is None else preprocessing_values({}, value)

    doc = (
        "The data config the model was trained with (``input_size``, ``mean``, ``std``, "
        "``interpolation``, ``crop_pct``), or ``None``: how image files and PIL images become "
        "tensors, and what ``save_pretrained`` records. Settable with any timm data config "
        "(``timm.data.resolve_model_data_config(model)``)."
    )
    return property(get, set_, doc=doc)


@dataclass
class Batches:
    """Batches of image tensors, and how many there are when that is known (for progress)."""

    batches: Iterable[Tensor]
    total: int | None


def _is_path(item: Any) -> bool:
    return isinstance(item, str | os.PathLike)


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with torchvision
        return False
    return isinstance(item, Image.Image)


def _is_image(item: Any) -> bool:
    return _is_path(item) or _is_pil(item) or (isinstance(item, Tensor) and item.dim() == 3)


def _tensor_batch(x: Tensor) -> Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(0)
    raise ValueError(
        f"An image tensor must be (channels, height, width) or a batch (batch, channels, "
        f"height, width), got shape {tuple(x.shape)}."
    )


def _images(items: Sequence[Any], transform: Callable[[], Callable], size: int) -> Iterator[Tensor]:
    """Stacks of ``size`` images; paths and PIL images through the transform."""
    made: Callable | None = None
    for start in range(0, len(items), size):
        tensors = []
        for item in items[start : start + size]:
            if isinstance(item, Tensor):
                tensors.append(item)
                continue
            made = made or transform()
            tensors.append(made(read_image(item, _channels(made)) if _is_path(item) else item))
        yield torch.stack(tensors)


def _channels(transform: Callable) -> int:
    return int(getattr(transform, "channels", 3))


def _loader_batches(loader: Iterable) -> Iterator[Tensor]:
    for index, batch in enumerate(loader):
        if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
            batch = batch[0]  # (images, labels, ...)
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"Batch {index} of the loader is a {type(batch).__name__}: each batch must be an "
                "image tensor or a tuple whose first item is one, e.g. (images, labels)."
            )
        yield _tensor_batch(batch)


def as_batches(x: ImageInput, transform: Callable[[], Callable], batch_size: int = 64) -> Batches:
    """``x`` as :class:`Batches`. ``transform()`` gives the image transform; it is called only
    when ``x`` holds paths or PIL images (so it may raise when there is no preprocessing)."""
    if isinstance(x, Tensor):
        return Batches([_tensor_batch(x)], 1)
    if _is_path(x) or _is_pil(x):
        return Batches(_images([x], transform, 1), 1)
    if hasattr(x, "__array__") and hasattr(x, "shape"):  # numpy: its rows are not batches
        raise TypeError(
            f"x must be a tensor batch of images, got {type(x).__name__}: convert it with "
            "torch.from_numpy(x) (preprocessed, channels first), or pass image files or PIL "
            "images."
        )
    if isinstance(x, list | tuple):
        if not x:
            raise ValueError("No images: the list is empty.")
        if all(_is_image(item) for item in x):
            return Batches(_images(list(x), transform, batch_size), -(-len(x) // batch_size))
        if any(_is_image(item) for item in x):
            kinds = sorted({type(item).__name__ for item in x})
            raise TypeError(
                f"A list must hold images (paths, PIL images, 3-D tensors) or batches, not a "
                f"mix: got {', '.join(kinds)}."
            )
        return Batches(_loader_batches(x), len(x))
    if isinstance(x, Mapping) or not isinstance(x, Iterable):
        raise TypeError(
            f"Cannot read images from a {type(x).__name__}: pass a tensor (one image or a "
            "batch), a path or a list of paths, a PIL image or a list of them, or a DataLoader "
            "of batches."
        )
    try:
        total = len(x)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return Batches(_loader_batches(x), total)
