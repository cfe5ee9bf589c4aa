"""The fine-tune's objectives: the flooding loss ``|CE − ξ| + ξ`` and its bound, outlier
exposure (OE) and Energy-OE."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from oodunleash.finetune.options import LossConstraintTooHighError
from oodunleash.runtime.distributed import is_main_process

__all__ = [
    "LossConstraintTooHighError",
    "check_below_chance",
    "check_two_logits",
    "energy_oe_loss",
    "flooding_loss",
    "oe_loss",
]


def flooding_loss(ce: Tensor, level: float | None) -> Tensor:
    """The flooding objective ``|ce − level| + level``.

    Its gradient equals that of ``ce`` when ``ce > level`` and its negative below: descent
    above the level, ascent below. ``level=None`` gives plain cross-entropy (the control).

    Example:
        >>> ce = torch.tensor(0.2, requires_grad=True)
        >>> flooding_loss(ce, 0.5).backward()
        >>> ce.grad
        tensor(-1.)
    """
    if level is None:
        return ce
    return (ce - level).abs() + level


def oe_loss(outlier_logits: Tensor) -> Tensor:
    """Outlier exposure (Hendrycks et al. 2019): cross-entropy from the softmax to the uniform
    distribution, averaged over the outliers."""
    return -(outlier_logits.log_softmax(dim=1).mean(dim=1)).mean()


def energy_oe_loss(
    id_logits: Tensor, outlier_logits: Tensor, m_in: float = -25.0, m_out: float = -7.0
) -> Tensor:
    """Energy-bounded learning (Liu et al. 2020): squared hinge pushing ID energy below
    ``m_in`` and outlier energy above ``m_out`` (energy = −logsumexp of the logits)."""
    energy_in = -torch.logsumexp(id_logits, dim=1)
    energy_out = -torch.logsumexp(outlier_logits, dim=1)
    return F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()


def check_two_logits(num_classes: int) -> None:
    """The fine-tune's cross-entropy needs one logit per class, two at least: over a single
    logit it is always 0, so there would be nothing to learn or flood."""
    if num_classes < 2:
        raise ValueError(
            f"The model returns {num_classes} logit per image; UM and UMAP fine-tune with the "
            "cross-entropy over classes and need at least two logits. For a binary classifier "
            "with one logit z, wrap it so that forward returns torch.cat([-z, z], dim=1) / 2 "
            "(the same probabilities as sigmoid(z))."
        )


def check_below_chance(loss_constraint: float | None, num_classes: int) -> None:
    """ξ must lie below ``ln(num_classes)``, the cross-entropy of a uniform guess: flooding
    around a higher level climbs *up* the loss and trains the model to be wrong. Above a
    quarter of it a warning is given: such levels cost UM much of its ID accuracy on the
    demo's drafts (docs/benchmarks/demo.md)."""
    if loss_constraint is None:
        return
    chance = math.log(num_classes)
    if 0.25 * chance < loss_constraint < chance and is_main_process():
        warnings.warn(
            f"The loss constraint ξ = {loss_constraint:.4g} is more than a quarter of the "
            f"loss of a uniform guess (ln({num_classes}) = {chance:.4g}); flooding this high "
            "usually costs ID accuracy. The default recipe (a multiple of the training loss) assumes a "
            "model trained to a low training loss; pass a smaller ξ "
            "(OODUnleash(model, constraint=ξ) or constraint=Relative(factor)) if this one is not.",
            stacklevel=6,  # the caller of train(), past the step and the epoch loop
        )
    if loss_constraint >= math.log(num_classes):
        raise LossConstraintTooHighError(
            f"The loss constraint ξ = {loss_constraint:.4g} is not below ln({num_classes}) = "
            f"{math.log(num_classes):.4g}, the loss of a uniform guess over {num_classes} "
            "classes; flooding towards it would train the model to be wrong. Pass a smaller "
            "ξ (OODUnleash(model, constraint=ξ)), or a lower factor (constraint=Relative(2.0); "
            "the default recipe sets ξ to a multiple of the training loss, too high for a model "
            "that fits its data this poorly)."
        )
