"""One forward pass, everything a score reads: logits, penultimate features, feature maps and the
last linear layer (:class:`FeatureSet`), gathered over a loader and across processes.

- :mod:`~oodunleash.features.heads`: finding the classifier's last linear layer.
- :mod:`~oodunleash.features.extractor`: :class:`FeatureExtractor`, the hooks on one model.
- :mod:`~oodunleash.features.feature_set`: :class:`FeatureSet`, what a pass returns.
- :mod:`~oodunleash.features.collect`: a pass over a loader (batched, distributed).
"""

from oodunleash.features.collect import collect_features, gather_feature_set
from oodunleash.features.extractor import FeatureExtractor
from oodunleash.features.feature_set import PER_SAMPLE, FeatureSet
from oodunleash.features.heads import LinearHead

__all__ = [
    "PER_SAMPLE",
    "FeatureExtractor",
    "FeatureSet",
    "LinearHead",
    "collect_features",
    "gather_feature_set",
]
