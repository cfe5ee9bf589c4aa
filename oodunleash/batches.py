"""Reading ``(images, labels)`` batches from user loaders, with clear errors when they are not."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_labels", "check_logits", "images_of", "iter_batches", "split_batch"]


def split_batch(batch: Any, *, need_labels: bool = True) -> tuple[Tensor, Tensor | None]:
    """Split a loader's batch into ``(images, labels)``.

    Accepts ``(images, labels, ...)`` tuples/lists, ``{"image"/"images"/"pixel_values",
    "label"/"labels"}`` dicts and, when labels are not needed, a bare image tensor.
    """
    images = labels = None
    if isinstance(batch, Tensor):
        images = batch
    elif isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    elif isinstance(batch, dict):
        images = next((batch[k] for k in ("image", "images", "pixel_values") if k in batch), None)
        labels = next((batch[k] for k in ("label", "labels") if k in batch), None)
    if not isinstance(images, Tensor) or (need_labels and not isinstance(labels, Tensor)):
        got = type(batch).__name__
        if isinstance(batch, list | tuple):
            got += f" of {[type(b).__name__ for b in batch]}"
        what = "(images, labels)" if need_labels else "images or (images, labels)"
        raise TypeError(
            f"The data loader must yield {what} batches of tensors; got {got}. Wrap your "
            "dataset so that __getitem__ returns (image_tensor, int_label), or pass a "
            "DataLoader over a TensorDataset(images, labels)."
        )
    if isinstance(labels, Tensor) and labels.dim() != 1:
        raise TypeError(
            f"Labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}. "
            "One-hot or soft labels are not supported: pass labels.argmax(dim=1)."
        )
    return images, labels


def images_of(batch: Any) -> Tensor:
    """The image tensor of a batch (labels, if any, are ignored)."""
    return split_batch(batch, need_labels=False)[0]


def check_logits(logits: Any, batch_size: int) -> Tensor:
    """The model's output must be a ``(batch, classes)`` tensor."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"The model must map a batch of {batch_size} images to logits of shape "
            f"(batch, classes); it returned {shape}. If it returns a tuple or dict, wrap it in a "
            "module whose forward returns only the logits."
        )
    return logits


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Labels must be integer class indices in ``[0, num_classes)``."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"Labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
            f"got values from {int(labels.min())} to {int(labels.max())}. Check that the "
            "loader holds the in-distribution classes the model was trained on, remapped to "
            "0..classes-1."
        )


def iter_batches(
    loader: Iterable, device: torch.device | None, *, need_labels: bool = True
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(images, labels)`` moved to ``device``; raise if the loader is empty."""
    empty = True
    for batch in loader:
        empty = False
        images, labels = split_batch(batch, need_labels=need_labels)
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
        yield images, labels
    if empty:
        raise ValueError("The data loader yielded no batches: is the dataset empty?")
