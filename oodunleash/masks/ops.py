"""Mask arithmetic: how many weights a mask keeps, the exact top-k, order statistics, and the
straight-through autograd functions that apply masks to weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_keep_ratio", "drop_below", "num_kept", "topk_mask"]


def num_kept(numel: int, keep_ratio: float) -> int:
    """How many of ``numel`` weights a mask keeps: ``round(keep_ratio * numel)``, at least 1."""
    return max(1, min(numel, round(keep_ratio * numel)))


def topk_mask(scores: Tensor, keep_ratio: float) -> Tensor:
    """Exact top-k mask: exactly :func:`num_kept` ones, ties broken by position.

    Example:
        >>> topk_mask(torch.tensor([0.3, 0.1, 0.3, 0.2]), 0.5)
        tensor([1., 0., 1., 0.])
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    k = num_kept(n, keep_ratio)
    if k == n:
        return torch.ones_like(scores)
    dropped = drop_below(flat, _threshold(flat, keep_ratio), k)
    return dropped.logical_not_().view_as(scores).to(scores.dtype)


def drop_below(flat: Tensor, threshold: Tensor, k: int, n_kept: int | None = None) -> Tensor:
    """The positions a top-``k`` mask drops, given ``threshold``, the ``k``-th largest entry
    of ``flat``: every entry below it, and of the entries equal to it, those after the first
    ones that make up ``k`` (ties broken by position).

    ``n_kept``, the number of entries at or above ``threshold`` when the caller already knows
    it, saves a count over ``flat``. Without ties the threshold entry is the only one equal to
    it, so the search for ties (a pass and a ``nonzero`` over ``flat``) runs only for real ties.

    Example:
        >>> drop_below(torch.tensor([0.3, 0.1, 0.3, 0.2]), torch.tensor(0.3), k=1)
        tensor([False,  True,  True,  True])
    """
    dropped = flat < threshold
    if n_kept is None:
        n_kept = flat.numel() - int(torch.count_nonzero(dropped))
    extra = n_kept - k
    if extra > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[-extra:]
        dropped[ties] = True
    return dropped


def _kth_smallest(values: Tensor, k: int, *, by_sort: bool | None = None) -> Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    On CPU ``kthvalue`` (a quickselect, linear time) is much faster than a sort. On CUDA it is
    the other way round: ``kthvalue`` of a single long row runs a radix select in one thread
    block, reported 20x slower than sorting the row (pytorch/pytorch#75599), so a CUDA tensor
    is sorted. ``by_sort`` forces either way (``None``: sort on CUDA only).

    Example:
        >>> _kth_smallest(torch.tensor([0.3, 0.1, 0.4, 0.2]), 2)
        tensor(0.2000)
    """
    if by_sort is None:
        by_sort = values.is_cuda
    if by_sort:
        return values.sort().values[k - 1]
    return values.kthvalue(k).values


def _threshold(values: Tensor, keep_ratio: float) -> Tensor:
    """The score at or above which ``keep_ratio`` of ``values`` lie (the k-th largest)."""
    m = values.numel()
    return _kth_smallest(values, m - num_kept(m, keep_ratio) + 1)


class _MaskedWeight(torch.autograd.Function):
    """The weight with its dropped entries zeroed; the gradient also reaches the scores
    (straight-through: d loss / d score = d loss / d masked weight x weight).

    Takes the *dropped* positions as a bool tensor: ``masked_fill`` reads a quarter of the
    bytes of a float mask and needs no conversion, and the score gradient needs no mask at
    all. Both matter on small inputs, where these element-wise passes rival the convolutions.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, dropped: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(weight, dropped)
        return weight.masked_fill(dropped, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, dropped = ctx.saved_tensors
        grad_weight = grad.masked_fill(dropped, 0) if ctx.needs_input_grad[0] else None
        grad_scores = grad * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None


class _MaskedWeights(torch.autograd.Function):
    """Every masked layer's weight at once: ``weight * kept`` and the straight-through
    gradients of :class:`_MaskedWeight`, as multi-tensor (``torch._foreach_*``) ops over all
    layers. Inputs after ``owner`` (the ``LayerMasks`` that made the pass, whose cached batch the
    backward pass clears) and ``kept``: all weights, then all scores."""

    @staticmethod
    def forward(ctx, owner: Any, kept: list[Tensor], *tensors: Tensor) -> tuple[Tensor, ...]:
        weights = list(tensors[: len(kept)])
        ctx.owner, ctx.kept = owner, kept
        ctx.save_for_backward(*weights)
        return tuple(torch._foreach_mul(weights, kept))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        # The pass's graph is spent: the next forward pass makes new masked weights.
        ctx.owner._batch = None
        weights = list(ctx.saved_tensors)
        n = len(weights)
        grads = list(grads)
        grad_weights: list[Tensor | None] = [None] * n
        grad_scores: list[Tensor | None] = [None] * n
        if any(ctx.needs_input_grad[2 : 2 + n]):
            grad_weights = list(torch._foreach_mul(grads, ctx.kept))
        if any(ctx.needs_input_grad[2 + n :]):
            grad_scores = list(torch._foreach_mul(grads, weights))
        return (None, None, *grad_weights, *grad_scores)


def check_keep_ratio(keep_ratio: float) -> float:
    """Validate a keep ratio (fraction of weights kept)."""
    if not isinstance(keep_ratio, int | float) or not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0, 1] (the fraction of weights kept), got {keep_ratio!r}. "
            "For example 0.8 keeps 80% of each layer."
        )
    return float(keep_ratio)
