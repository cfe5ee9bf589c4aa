"""Reading user data for a user model: ``(images, labels)`` batches from loaders, the model's
logits from whatever its forward returns, and the first-batch checks that name both sides of a
model/data mismatch instead of letting a raw torch error through."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from oodunleash.runtime.modules import model_device

__all__ = [
    "cast_images",
    "check_finite",
    "check_label_dtype",
    "check_label_range",
    "check_labels",
    "check_logits",
    "check_model_input",
    "diagnose_input",
    "explain_forward_error",
    "images_of",
    "iter_batches",
    "logits_of",
    "model_dtype",
    "named_ood_loaders",
    "nonfinite_error",
    "nonfinite_images_error",
    "split_batch",
]


def _is_loader(obj: Any) -> bool:
    """A loader-like object (iterable of batches), not a batch itself."""
    if isinstance(obj, torch.utils.data.DataLoader):
        return True
    return hasattr(obj, "__iter__") and not isinstance(obj, Tensor | list | tuple | Mapping | str)


_IMAGE_KEYS = ("image", "images", "pixel_values")
_LABEL_KEYS = ("label", "labels")


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
        images = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    if _is_loader(batch):
        raise TypeError(
            f"The data loader yielded a {type(batch).__name__}, not a batch: a list of loaders "
            "was passed where one loader is expected. Pass several OOD sets as a dict "
            "{name: loader}."
        )
    if not isinstance(images, Tensor) or (need_labels and not isinstance(labels, Tensor)):
        got = type(batch).__name__
        if isinstance(batch, list | tuple):
            got += f" of {[type(b).__name__ for b in batch]}"
        if isinstance(batch, dict):
            _dict_batch_error(batch, images, need_labels)
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


def _dict_batch_error(batch: dict, images: Any, need_labels: bool) -> NoReturn:
    missing = "images" if not isinstance(images, Tensor) else "labels"
    keys = _IMAGE_KEYS if missing == "images" else _LABEL_KEYS
    found = ", ".join(repr(k) for k in batch) or "none"
    raise TypeError(
        f"The data loader yields dict batches, and none of their keys holds the {missing} as a "
        f"tensor: accepted keys are {', '.join(repr(k) for k in keys)}; found {found}. Rename "
        "the key in your dataset or collate function"
        + (", or yield (images, labels) tuples." if need_labels else ", or yield image tensors.")
    )


def images_of(batch: Any) -> Tensor:
    """The image tensor of a batch (labels, if any, are ignored)."""
    return split_batch(batch, need_labels=False)[0]


def named_ood_loaders(ood_loaders: Any) -> dict[str, Iterable]:
    """``{name: loader}`` from what ``evaluate`` was given: a mapping, or one loader (``"ood"``).

    A list or tuple of loaders is refused (its items would be read as batches), as are an
    empty mapping and names that are not strings.

    Example:
        >>> named_ood_loaders([[torch.zeros(2, 3)]])
        {'ood': [[tensor([[0., 0., 0.],
                [0., 0., 0.]])]]}
    """
    if isinstance(ood_loaders, Mapping):
        if not ood_loaders:
            raise ValueError("ood_loaders is empty: pass {'name': loader, ...}.")
        bad = [name for name in ood_loaders if not isinstance(name, str) or not name]
        if bad:
            raise TypeError(f"OOD set names must be non-empty strings, got {bad!r}.")
        return dict(ood_loaders)
    if (
        isinstance(ood_loaders, list | tuple)
        and ood_loaders
        and all(_is_loader(item) for item in ood_loaders)
    ):
        raise TypeError(
            f"ood_loaders is a {type(ood_loaders).__name__} of {len(ood_loaders)} loaders; pass a "
            "dict {name: loader} so that each OOD set's results carry its name, e.g. "
            "{'noise': noise_loader, 'svhn': svhn_loader}."
        )
    return {"ood": ood_loaders}


# --------------------------------------------------------------------------- model outputs
def logits_of(output: Any, output_key: str | None = None) -> Any:
    """The logits in a model's output: the output itself when it is a tensor, else its
    ``output_key`` (default ``"logits"``) item or attribute, as Hugging Face models return.

    Example:
        >>> logits_of({"logits": torch.ones(1, 2), "hidden": None})
        tensor([[1., 1.]])
    """
    if isinstance(output, Tensor) and output_key is None:
        return output
    key = output_key or "logits"
    if isinstance(output, Mapping) and key in output:
        return output[key]
    value = getattr(output, key, None)
    if isinstance(value, Tensor):
        return value
    if output_key is not None:
        keys = list(output) if isinstance(output, Mapping) else type(output).__name__
        raise ValueError(
            f"output_key={output_key!r}: the model's output has no such item or attribute "
            f"(it returned {keys})."
        )
    return output


def check_logits(logits: Any, batch_size: int, output_key: str | None = None) -> Tensor:
    """The model's output must hold ``(batch, classes)`` logits (see :func:`logits_of`)."""
    logits = logits_of(logits, output_key)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        if isinstance(logits, Mapping):
            shape = f"a {shape} with keys {list(logits)}"
        if isinstance(logits, tuple | list):  # timm's distilled models in distilled training
            hint = (
                "Wrap the model in a module whose forward returns only the logits. A timm model "
                "with a distillation head (LeViT, DeiT distilled) returns a tuple while "
                "distilled training is on: call model.set_distilled_training(False)."
            )
        else:
            hint = (
                "An output with a 'logits' item or attribute is read (a FeatureExtractor also "
                "takes output_key='...' for another name); otherwise wrap the model in a "
                "module whose forward returns only the logits."
            )
        raise ValueError(
            f"The model must map a batch of {batch_size} images to logits of shape "
            f"(batch, classes); it returned {shape}. {hint}"
        )
    return logits


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Labels must be integer class indices in ``[0, num_classes)``."""
    check_label_dtype(labels)
    if labels.numel():
        check_label_range(int(labels.min()), int(labels.max()), num_classes)


def check_label_dtype(labels: Tensor) -> None:
    """Labels must be integer class indices: a ``TypeError`` for floating or boolean ones."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"Labels must be integer class indices, got dtype {labels.dtype}.")


def check_label_range(low: int, high: int, num_classes: int) -> None:
    """Labels from ``low`` to ``high`` must lie in ``[0, num_classes)`` (read apart from the
    labels, so that a pass can take their extremes on the device and check them once).

    Example:
        >>> check_label_range(0, 7, 5)
        Traceback (most recent call last):
        ...
        ValueError: Labels must lie in [0, 5) for a model with 5 outputs; got values from 0 to 7. Check that the loader holds the in-distribution classes the model was trained on, remapped to 0..classes-1.
    """
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
            f"got values from {low} to {high}. Check that the "
            "loader holds the in-distribution classes the model was trained on, remapped to "
            "0..classes-1."
        )


def check_finite(values: Tensor, what: str, fix: str) -> None:
    """Raise a ``ValueError`` naming ``what`` and the ``fix`` when ``values`` holds NaN or inf.

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "The scores", "check the data.")
        Traceback (most recent call last):
        ...
        ValueError: The scores contain 1 NaN/inf value(s): check the data.
    """
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise nonfinite_error(what, int((~torch.isfinite(values)).sum()), fix)


def nonfinite_error(what: str, count: int, fix: str) -> ValueError:
    """The error of :func:`check_finite` for ``count`` NaN/inf values counted elsewhere (on
    the device during a pass, read back once at its end)."""
    return ValueError(f"{what} contain {count} NaN/inf value(s): {fix}")


# --------------------------------------------------------------------------- model inputs
def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``model``'s first floating parameter (then buffer), or ``None``.

    Example:
        >>> model_dtype(nn.Linear(2, 2).to(torch.bfloat16))
        torch.bfloat16
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def cast_images(images: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Floating-point ``images`` in ``dtype`` (the model's); other images unchanged.

    Example:
        >>> cast_images(torch.zeros(1, 2), torch.bfloat16).dtype
        torch.bfloat16
    """
    if dtype is not None and images.is_floating_point() and images.dtype != dtype:
        return images.to(dtype)
    return images


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            return name, module
    return None


def _expected_size(model: nn.Module) -> tuple[int, int] | None:
    """The fixed input size of a timm vision transformer (``patch_embed.img_size`` with
    ``strict_img_size``), else ``None``."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if getattr(embed, "strict_img_size", False) and size is not None:
        return tuple(size)
    return None


#: The fix :func:`check_model_input` names for NaN/inf pixels.
_CLEAN_IMAGES = "clean the data or check its transform."


def _describe(images: Any) -> str:
    return f"images of shape {tuple(images.shape)} ({images.dtype}, on {images.device})"


def check_model_input(model: nn.Module, images: Tensor) -> None:
    """Checks before a forward pass: ``images`` must be a tensor without NaN/inf values.

    What depends on the model (dtype, device, shape) is diagnosed by :func:`diagnose_input`
    only when the forward pass fails, so models that adapt their input themselves (an
    ``x.float() / 255`` or an ``unsqueeze`` in ``forward``, token ids) keep working.

    Example:
        >>> check_model_input(nn.Linear(2, 2), torch.tensor([[0.0, float("inf")]]))
        Traceback (most recent call last):
        ...
        ValueError: The images of shape (1, 2) (torch.float32, on cpu) contain 1 NaN/inf value(s): clean the data or check its transform.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"Images must be a tensor batch, got {type(images).__name__}.")
    check_finite(images, f"The {_describe(images)}", _CLEAN_IMAGES)


def nonfinite_images_error(images: Any, count: int) -> ValueError:
    """The error of :func:`check_model_input` for ``count`` NaN/inf values in ``images`` (a
    tensor, or anything with its ``shape``, ``dtype`` and ``device``)."""
    return nonfinite_error(f"The {_describe(images)}", count, _CLEAN_IMAGES)


def _conv_rank(conv: nn.Module) -> int:
    return next(
        r for cls, r in ((nn.Conv1d, 3), (nn.Conv2d, 4), (nn.Conv3d, 5)) if isinstance(conv, cls)
    )


def diagnose_input(model: nn.Module, images: Tensor) -> str | None:
    """Why ``images`` do not fit ``model``, naming both sides, or ``None`` when no known
    mismatch is found: integer images for a floating-point model, another device, an unbatched
    image and a wrong channel count (read from the first convolution), a wrong size for a
    fixed-size timm model.

    Example:
        >>> print(diagnose_input(nn.Conv2d(3, 4, 1), torch.zeros(2, 1, 8, 8)))
        The images of shape (2, 1, 8, 8) (torch.float32, on cpu) have 1 channels but the model's first layer '' takes 3: convert the images (e.g. grayscale to RGB with images.expand(-1, 3, -1, -1)) or build the model with in_chans=1.
    """
    dtype, device = model_dtype(model), model_device(model)
    if dtype is not None and not images.is_floating_point():
        return (
            f"The model's weights are {dtype} but the {_describe(images)} are not floating "
            "point: convert them, e.g. images.float() / 255 (torchvision's ToTensor does it)."
        )
    if images.device != device:
        return (
            f"The {_describe(images)} are not on the model's device {device}: move them with "
            f"images.to({str(device)!r}) (or the model to the data's device)."
        )
    first = _first_layer(model)
    if first is not None and not isinstance(first[1], nn.Linear):
        name, conv = first
        rank = _conv_rank(conv)
        if images.dim() == rank - 1:
            return (
                f"The {_describe(images)} look like one unbatched sample: the model's first "
                f"layer {name!r} ({type(conv).__name__}) expects {rank}-D batches. Add the "
                "batch dimension with images.unsqueeze(0)."
            )
        if images.dim() == rank and images.shape[1] != conv.in_channels:
            return (
                f"The {_describe(images)} have {images.shape[1]} channels but the model's "
                f"first layer {name!r} takes {conv.in_channels}: convert the images (e.g. "
                "grayscale to RGB with images.expand(-1, 3, -1, -1)) or build the model with "
                f"in_chans={images.shape[1]}."
            )
    size = _expected_size(model)
    if size is not None and images.dim() == 4 and tuple(images.shape[-2:]) != size:
        return (
            f"The {_describe(images)} are {tuple(images.shape[-2:])} pixels but the model takes "
            f"{size}: resize the images, or create the timm model with img_size="
            f"{tuple(images.shape[-2:])} (or dynamic_img_size=True)."
        )
    return None


def explain_forward_error(model: nn.Module, images: Tensor, err: Exception) -> Exception:
    """A short error for a forward pass that failed: the mismatch :func:`diagnose_input` finds,
    else what went in, what the model holds, and the first line of torch's message."""
    problem = diagnose_input(model, images)
    if problem is not None:
        kind = TypeError if problem.startswith("The model's weights") else ValueError
        return kind(problem)
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return ValueError(
        f"{type(model).__name__} failed on a batch of {_describe(images)}; the model's "
        f"weights are {model_dtype(model)} on {model_device(model)}. Torch said: {reason}. "
        "Check the image size and channel count the model was built for."
    )


def iter_batches(
    loader: Iterable,
    device: torch.device | None,
    *,
    need_labels: bool = True,
    source: str = "data loader",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(images, labels)`` moved to ``device`` (floating images cast to ``dtype``, the
    model's, when given: see :func:`model_dtype`); raise, naming ``source``, if the loader is
    empty."""
    empty = True
    for batch in loader:
        empty = False
        images, labels = split_batch(batch, need_labels=need_labels)
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
        yield cast_images(images, dtype), labels
    if empty:
        raise ValueError(f"The {source} yielded no batches: is the dataset empty?")
