"""UMAP masks in a checkpoint: baked into the weights, or stored to go on training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oodunleash.checkpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from oodunleash.checkpoint.format import MASKS_NAME
from oodunleash.checkpoint.tensors import (
    load_tensors,
    pack_bits,
    split_prefixed,
    tensors_for_saving,
    unpack_bits,
)
from oodunleash.masks.layer_masks import LayerMasks, topk_mask, zero_fraction

__all__ = ["baked_state_dict", "masks_for_saving", "plain_layer_name", "restore_masks"]

_COMPILED = "_orig_mod."


def plain_layer_name(name: str) -> str:
    """A layer's name in the plain model (a wrapper made around a ``torch.compile``'d model
    names its layers ``_orig_mod.<name>``)."""
    return name[len(_COMPILED) :] if name.startswith(_COMPILED) else name


def _weight_key(masks: LayerMasks, name: str) -> str:
    """The plain model's ``state_dict`` key of layer ``name``'s masked weight (``weight``, or
    e.g. ``in_proj_weight`` of an attention layer)."""
    return plain_layer_name(masks.parameter_name(name))


def baked_state_dict(model: nn.Module, masks: LayerMasks | None) -> dict[str, Tensor]:
    """The plain model's ``state_dict`` with the exact masks multiplied in (pruned weights are
    exact zeros). ``state_dict`` reads the raw parameters, also while masks are attached."""
    state = model.state_dict()
    if masks is not None:
        for name in masks.layer_names:
            key = _weight_key(masks, name)
            weight = state[key]
            state[key] = weight * masks.mask(name, exact=True).to(weight.device, weight.dtype)
    return tensors_for_saving(state, "The model's state_dict")


def masks_for_saving(
    model: nn.Module, masks: LayerMasks | None, baked: dict[str, Tensor], keep_masks: bool
) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """The config entry describing the masks, and the tensors of ``oodunleash_masks`` (empty
    unless ``keep_masks``)."""
    if masks is None:
        return None, {}
    sparsity = zero_fraction(baked[_weight_key(masks, name)] for name in masks.layer_names)
    info: dict[str, Any] = {
        "storage": "scores" if keep_masks else "baked",
        "sparsity": sparsity,
        "keep_ratio": masks.keep_ratio,
        "mode": masks.mode,
        "init": masks.init,
        "seed": masks.seed,
    }
    tensors: dict[str, Tensor] = {}
    if keep_masks:
        state = model.state_dict()
        for name in masks.layer_names:
            keep = masks.mask(name, exact=True).detach().cpu().bool()
            dense = state[_weight_key(masks, name)].detach().cpu()
            plain = plain_layer_name(name)
            tensors[f"{plain}/scores"] = masks.layer_scores(name).detach().cpu().contiguous()
            tensors[f"{plain}/mask"] = pack_bits(keep)
            # Only the pruned values: the kept ones are already in model.safetensors.
            tensors[f"{plain}/pruned"] = dense[~keep].contiguous()
    return info, tensors


def restore_masks(
    model: nn.Module, layer_names: list[str], info: dict[str, Any], folder: Path, where: str
) -> LayerMasks:
    """The stored masks, not yet attached (the wrapper refuses a model that carries a mask):
    ``model``'s raw weights get their pruned values back, so the mask can still move."""
    path = folder / MASKS_NAME
    if not path.is_file():
        raise CorruptCheckpointError(f"The checkpoint in {where} lacks {MASKS_NAME}.")
    grouped = split_prefixed(load_tensors(path), path)
    masks = LayerMasks(
        model,
        layer_names,
        keep_ratio=info["keep_ratio"],
        mode=info["mode"],
        init=info["init"],
        seed=info["seed"],
    )
    missing = [n for n in masks.layer_names if n not in grouped]
    if missing:
        raise CorruptCheckpointError(f"{MASKS_NAME} in {where} lacks the layers {missing}.")
    stored: dict[str, Tensor] = {}
    with torch.no_grad(), masks.detached():
        for name in masks.layer_names:
            parts = grouped[name]
            scores = masks.layer_scores(name)
            if tuple(parts["scores"].shape) != tuple(scores.shape):
                raise CheckpointMismatchError(
                    f"Mask scores of layer {name!r} have shape {tuple(parts['scores'].shape)}, "
                    f"the layer {tuple(scores.shape)} ({where})."
                )
            keep = unpack_bits(parts["mask"], scores.shape)
            pruned = parts["pruned"]
            if pruned.numel() != int((~keep).sum()):
                raise CorruptCheckpointError(
                    f"{MASKS_NAME} in {where}: layer {name!r} stores {pruned.numel()} pruned "
                    f"values for {int((~keep).sum())} pruned weights."
                )
            weight = masks.raw_weight(name)  # the parameter itself, also while masked
            weight[~keep.to(weight.device)] = pruned.to(weight.device, weight.dtype)
            scores.copy_(parts["scores"].to(scores.device, scores.dtype))
            stored[name] = keep
    for name, keep in stored.items():
        if masks.mode == "layer":
            recomputed = topk_mask(masks.layer_scores(name), masks.keep_ratio).bool().cpu()
        else:
            recomputed = masks.mask(name, exact=True).bool().cpu()
        if not torch.equal(recomputed, keep):
            raise CorruptCheckpointError(
                f"The stored mask scores of layer {name!r} do not reproduce the stored mask in "
                f"{where}: {MASKS_NAME} is damaged."
            )
    return masks
