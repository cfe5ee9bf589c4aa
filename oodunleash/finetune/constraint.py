"""The loss constraint ξ: the training loss Unleashing Mask fine-tunes towards.

The paper's recipe: mask out a small random fraction of the chosen layers of the trained model
(keep 96.5%) and measure the mean cross-entropy of that masked model on the in-distribution
training data, in eval mode. That loss stands in for the loss of the model at an intermediate
stage of training, before it memorised the atypical samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from oodunleash.finetune.losses import check_two_logits
from oodunleash.finetune.recipes import (
    DEFAULT_CONSTRAINT_FACTOR,
    check_loss_constraint,
    real_number,
)
from oodunleash.masks.layer_masks import LayerMasks, LayerSelector, check_keep_ratio
from oodunleash.runtime.batches import (
    check_labels,
    check_logits,
    explain_forward_error,
    iter_batches,
)
from oodunleash.runtime.distributed import all_reduce_sum, is_main_process, real_samples
from oodunleash.runtime.modules import model_device

__all__ = [
    "DEFAULT_CONSTRAINT_FACTOR",
    "check_loss_constraint",
    "estimate_loss_constraint",
    "mean_cross_entropy",
    "relative_loss_constraint",
]


@torch.no_grad()
def mean_cross_entropy(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "cross-entropy",
) -> float:
    """Sample-weighted mean cross-entropy of ``model`` over ``loader``, in eval mode.

    Under ``torch.distributed`` the sums are taken over all ranks' data, without the samples a
    ``DistributedSampler`` repeats to even out the shards, so the result equals the mean over
    the dataset computed in one process (up to float rounding). ``max_batches`` then counts
    batches per rank.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> round(mean_cross_entropy(net, data), 4) == round(
        ...     float(F.cross_entropy(net(data[0][0]), data[0][1])), 4)
        True
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0  # samples this rank has read so far (locates DistributedSampler padding)
    try:
        batches = iter_batches(loader, device)
        total_batches = len(loader) if hasattr(loader, "__len__") else None
        if max_batches is not None and total_batches is not None:
            total_batches = min(total_batches, max_batches)
        bar = tqdm(
            batches, total=total_batches, desc=desc, disable=not (progress and is_main_process())
        )
        for i, (images, labels) in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            try:
                output = model(images)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # name the mismatch, not torch's shape arithmetic
                raise explain_forward_error(model, images, exc) from exc
            logits = check_logits(output, images.shape[0])
            check_two_logits(logits.shape[1])
            check_labels(labels, logits.shape[1])
            # A DistributedSampler repeats a few samples to even out the shards; leaving the
            # repeats out makes ξ the mean over the dataset, as in one process.
            real = real_samples(loader, seen, labels.numel())
            seen += labels.numel()
            if real is not None:
                logits, labels = logits[real.to(logits.device)], labels[real.to(labels.device)]
            total += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            count += labels.numel()
    finally:
        model.train(was_training)
    all_reduce_sum(total)
    all_reduce_sum(count)
    return float(total / count)


def estimate_loss_constraint(
    model: nn.Module,
    loader: Iterable,
    keep_ratio: float = 0.965,
    *,
    layers: LayerSelector | None = None,
    exclude: LayerSelector | None = None,
    init: Literal["random", "magnitude"] = "random",
    draws: int = 1,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> float:
    """Estimate ξ: the mean ID cross-entropy of ``model`` with its chosen layers masked.

    Args:
        model: The trained classifier. It is left exactly as it was (no mask stays attached).
        loader: In-distribution training data yielding ``(images, labels)``.
        keep_ratio: Fraction of each chosen layer kept (the reference: 0.965).
        layers, exclude: Which layers are masked, see :func:`~oodunleash.masks.layer_masks.select_layers`.
        init: ``"random"`` scores (the reference) or ``"magnitude"`` (prunes the smallest
            weights, which changes the loss far less).
        draws: Average over this many independent random masks (reduces the variance that a
            single random draw has on small models).
        seed: Seeds the random masks.
        device: Where to run; default: the model's device.
        max_batches: Use only the first batches of ``loader`` (a cheaper estimate).
        progress: Show a progress bar.

    Returns:
        ξ as a Python float.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> before = [p.clone() for p in net.parameters()]
        >>> xi = estimate_loss_constraint(net, data, keep_ratio=0.9, draws=2, progress=False)
        >>> isinstance(xi, float), xi != mean_cross_entropy(net, data)
        (True, True)
        >>> all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # model unchanged
        True
    """
    check_keep_ratio(keep_ratio)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}.")
    values = []
    for draw in range(draws):
        masks = LayerMasks(
            model, layers, exclude, keep_ratio=keep_ratio, init=init, seed=seed + draw
        )
        with masks.attached():
            values.append(
                mean_cross_entropy(
                    model,
                    loader,
                    device=device,
                    max_batches=max_batches,
                    progress=progress,
                    desc=f"estimating ξ ({draw + 1}/{draws})" if draws > 1 else "estimating ξ",
                )
            )
    return float(sum(values) / len(values))


def relative_loss_constraint(
    model: nn.Module,
    loader: Iterable,
    factor: float = DEFAULT_CONSTRAINT_FACTOR,
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> float:
    """ξ as a multiple of the model's own mean ID training cross-entropy (eval mode).

    The library's default recipe (:class:`~oodunleash.config.Relative`). The paper's
    masked-model estimate (:func:`estimate_loss_constraint`) came out many times the training
    loss on the benchmark's small models and cost them accuracy; ``docs/benchmarks.md`` has the
    numbers, and where this recipe did not beat the plain fine-tune control. Compare with
    ``fit(..., flooding=False)`` on validation data before keeping a result.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> relative_loss_constraint(net, data, 2.0, progress=False) == 2 * mean_cross_entropy(
        ...     net, data)
        True
    """
    try:
        value = real_number(factor, "factor")
    except TypeError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"The ξ factor must be a positive number, got {factor!r}.")
    return value * mean_cross_entropy(
        model,
        loader,
        device=device,
        max_batches=max_batches,
        progress=progress,
        desc="training loss for ξ",
    )
