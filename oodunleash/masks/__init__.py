"""Pruning masks on a model's layers (UMAP's mask, and the masked model behind ξ's recipe).

- :mod:`~oodunleash.masks.selection`: which layers are masked (``layers`` / ``exclude``).
- :mod:`~oodunleash.masks.layer_masks`: :class:`LayerMasks`, the scores, their top-k masks and
  how they attach to a model.
- :mod:`~oodunleash.masks.ops`: the top-k drop and the autograd functions of a masked weight.
- :mod:`~oodunleash.masks.thresholds`: per-layer and model-wide keep thresholds.
- :mod:`~oodunleash.masks.surgery`: how an attached module reads its masked weight.
"""

from oodunleash.masks.layer_masks import (
    DEFAULT_LAYER_TYPES,
    LayerMasks,
    LayerSelector,
    attached_masks,
    check_keep_ratio,
    masked_parameters,
    num_kept,
    select_layers,
    topk_mask,
    zero_fraction,
)

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerMasks",
    "LayerSelector",
    "attached_masks",
    "check_keep_ratio",
    "masked_parameters",
    "num_kept",
    "select_layers",
    "topk_mask",
    "zero_fraction",
]
