"""Module surgery: how a :class:`~oodunleash.masks.layer_masks.LayerMasks` makes a layer read its weight
masked. An attached module's class is swapped for a subclass whose weight attribute is a
property asking the masks for the masked weight; detaching swaps the class back."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MASK_ATTR", "masked_class", "unmask_module"]

#: Where an attached module keeps ``(its LayerMasks, {parameter: layer name})``.
MASK_ATTR = "_oodunleash_mask"

_MASKED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _masked_property(param: str) -> property:
    def read(module: nn.Module) -> Tensor:
        owner, names = module.__dict__[MASK_ATTR]
        ready = owner._ready
        if ready is not None:  # made before a compiled forward pass: a lookup Dynamo traces
            return ready[names[param]]
        return owner._read_masked(names[param], module._parameters[param], module.training)

    return property(read)


def masked_class(cls: type, params: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``params`` read as masked weights (made once per class)."""
    key = (cls, params)
    if key not in _MASKED_CLASSES:
        _MASKED_CLASSES[key] = type(
            f"Masked{cls.__name__}",
            (cls,),
            {
                **{param: _masked_property(param) for param in params},
                "_oodunleash_original_class": cls,
                "__module__": cls.__module__,
            },
        )
    return _MASKED_CLASSES[key]


def unmask_module(module: nn.Module) -> None:
    """Give an attached module its own class back and forget its masks."""
    if MASK_ATTR in module.__dict__:
        module.__class__ = module._oodunleash_original_class
        del module.__dict__[MASK_ATTR]
