"""What detectors read: :class:`FeatureSet`, the per-sample tensors of a batch or a data set
(logits, penultimate features, feature maps, labels) plus the head and the network."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from oodunleash.features.heads import LinearHead

__all__ = ["PER_SAMPLE", "FeatureSet", "check_score_output"]

#: Per-sample fields of a :class:`FeatureSet` that :func:`~oodunleash.features.collect.collect_features`
#: can keep.
PER_SAMPLE = ("logits", "features", "feature_maps", "labels")


_HOW_TO_GET = {
    "logits": "build it with FeatureSet(logits=...)",
    "features": "build it with FeatureSet(features=...)",
    "feature_maps": (
        "use a timm model, or name the layer whose output is the pre-pool feature map with "
        "OODUnleash(model, feature_layer='layer4')"
    ),
    "labels": "pass a loader yielding (images, labels) to fit_scores",
    "head": (
        "the classifier head must be an nn.Linear: name it with OODUnleash(model, head='fc') "
        "or build the FeatureSet with head=LinearHead(weight, bias)"
    ),
    "images": "gradient-based scores are computed from images: use unleashed.score/evaluate",
    "network": "gradient-based scores need the model: FeatureSet(images=..., network=model)",
}


@dataclass
class FeatureSet:
    """What detectors read: per-sample tensors of a batch or a whole data set, plus context.

    Every field is optional; a score calls :meth:`require` for what it needs, which fails with a
    message naming the fix. Per-sample fields share the first dimension.

    Attributes:
        logits: ``(n, classes)`` model outputs.
        features: ``(n, dim)`` penultimate features (the classifier head's input).
        feature_maps: ``(n, channels, ...)`` pre-pool feature maps.
        labels: ``(n,)`` class labels (ID training data).
        head: The last layer's weight and bias.
        images: ``(n, ...)`` inputs, for gradient-based scores.
        network: The :class:`FeatureExtractor` (or any ``nn.Module``/callable images → logits)
            that produced the set, for scores that run the model.
        index: ``(n,)`` position of each sample in its data set.
        device: Where heavy computations should run (the model's device); defaults to the
            device of the tensors.
    """

    logits: Tensor | None = None
    features: Tensor | None = None
    feature_maps: Tensor | None = None
    labels: Tensor | None = None
    head: LinearHead | None = None
    images: Tensor | None = None
    network: Any = None
    index: Tensor | None = None
    device: torch.device | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def require(self, what: str, by: str = "this score") -> Any:
        """The field ``what``; raises a ``ValueError`` naming the fix when it is missing."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(
                f"The {by!r} score needs {what.replace('_', ' ')}, which this model/data does "
                f"not provide: {_HOW_TO_GET.get(what, 'provide it in the FeatureSet')}."
            )
        return value

    def __len__(self) -> int:
        for name in (*PER_SAMPLE, "images"):
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        return 0

    @property
    def compute_device(self) -> torch.device:
        """Where heavy computations on this set should run.

        Returns:
            :attr:`device` when set, else the device of the first per-sample tensor (or
            ``images``) present, else the CPU.
        """
        if self.device is not None:
            return torch.device(self.device)
        for name in (*PER_SAMPLE, "images"):
            value = getattr(self, name)
            if value is not None:
                return value.device
        return torch.device("cpu")

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Logits of (modified) penultimate features, through the head."""
        return self.require("head", "logits from features")(features)

    def logits_from_maps(self, maps: Tensor) -> Tensor:
        """Logits of (modified) feature maps: the model's own head where known, else the
        spatial mean through the linear head (global average pooling)."""
        from_maps = getattr(self.network, "logits_from_maps", None)
        if callable(from_maps):  # a FeatureExtractor: the model's own head
            return from_maps(maps)
        pooled = maps.flatten(2).mean(dim=2) if maps.dim() > 2 else maps
        return self.logits_from_features(pooled)

    def forward_logits(self, images: Tensor) -> Tensor:
        """Run the model (with autograd as the caller sets it) on ``images``."""
        network = self.require("network", "gradient")
        if callable(getattr(network, "logits", None)):  # a FeatureExtractor
            return network.logits(images)
        return network(images)

    def select(self, rows: Tensor | slice) -> FeatureSet:
        """The same set restricted to ``rows`` (per-sample fields only)."""
        kept = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if f.name in (*PER_SAMPLE, "images", "index") and getattr(self, f.name) is not None
        }
        return replace(self, **kept, extra={k: v[rows] for k, v in self.extra.items()})


def check_score_output(name: str, out: Any, n: int, *, to_cpu: bool = True) -> Tensor:
    """A score's output for ``n`` samples as a detached float32 tensor, on the CPU unless
    ``to_cpu=False`` (a pass that keeps per-batch scores on the device until its end); a
    ``ValueError`` naming the score unless it is a 1-D tensor of ``n`` values.

    Example:
        >>> check_score_output("mine", torch.zeros(2, 1), 2)
        Traceback (most recent call last):
        ...
        ValueError: Score 'mine' must return a 1-D tensor with one value per sample (2), got (2, 1).
    """
    if not isinstance(out, Tensor) or out.shape != (n,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"Score {name!r} must return a 1-D tensor with one value per sample ({n}), got {got}."
        )
    out = out.detach().float()
    return out.cpu() if to_cpu else out
