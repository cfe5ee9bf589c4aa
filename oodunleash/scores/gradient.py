"""Gradient-based scores: ODIN (input gradients, runs the model again) and GradNorm (last-layer
gradients, in closed form from the cached logits and features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from oodunleash.features.collect import FeatureSet
from oodunleash.scores.base import OODScore, positive_option, register_score

__all__ = ["ODIN", "GradNorm"]


@register_score
class ODIN(OODScore):
    """ODIN (Liang, Li & Srikant, ICLR 2018): temperature scaling and input pre-processing.

    The input is moved by ``epsilon`` against the sign of the gradient of the temperature-scaled
    cross-entropy on the predicted class (which raises the predicted class's softmax), then the
    score is the maximum temperature-scaled softmax of the moved input. T = 1000, ε = 0.0014.

    Args:
        temperature: T.
        epsilon: Perturbation size, in the units of the model's input.
        std: Per-channel standard deviations of the input normalisation. The original code
            moves images in ``[0, 1]`` pixel space and its gradient passes through the
            normalisation, which divides the step by ``std``; pass the ``std`` your transform
            uses to reproduce that. Default ``None``: the step is taken in the model's input
            space (deviation from the reference code when inputs are normalised).

    Costs two extra forward passes and one backward pass per batch.
    """

    name = "odin"
    requires = frozenset({"gradients"})

    def __init__(
        self,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        std: Sequence[float] | None = None,
    ) -> None:
        self.temperature = positive_option("temperature", temperature)
        self.epsilon = positive_option("epsilon", epsilon, allow_zero=True)
        self.std = tuple(float(s) for s in std) if std is not None else None

    def score(self, data: FeatureSet) -> Tensor:
        images = data.require("images", self.name).detach()
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = data.forward_logits(x).float() / self.temperature
            # Sum, not mean: each sample's gradient is then its own loss's gradient.
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        step = (grad >= 0).to(images.dtype) * 2 - 1  # sign, with 0 -> +1 as the reference
        if self.std is not None:
            std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
            step = step / std.view(1, -1, *([1] * (images.dim() - 2)))
        with torch.no_grad():
            moved = data.forward_logits(images - self.epsilon * step).float()
            return torch.softmax(moved / self.temperature, dim=1).max(dim=1).values


@register_score
class GradNorm(OODScore):
    """GradNorm (Huang, Geng & Li, NeurIPS 2021): L1 norm of the gradient of
    ``KL(uniform || softmax(logits / T))`` with respect to the last layer's weight, T = 1.

    For a linear last layer that gradient is ``(softmax(z / T) - 1/C) h^T / T``, whose L1 norm is
    ``||softmax(z / T) - 1/C||_1 * ||h||_1 / T``: computed in closed form for the whole batch
    from the cached logits ``z`` and features ``h``, without another forward/backward pass
    (identical to the per-sample backward of the reference code, which is verified in the
    tests).
    """

    name = "gradnorm"
    requires = frozenset({"logits", "features"})

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = positive_option("temperature", temperature)

    def score(self, data: FeatureSet) -> Tensor:
        logits = data.require("logits", self.name).float()
        feats = data.require("features", self.name).float()
        probs = torch.softmax(logits / self.temperature, dim=1)
        logit_grad = (probs - 1.0 / logits.shape[1]).abs().sum(dim=1) / self.temperature
        return logit_grad * feats.abs().sum(dim=1)
