"""ξ recipes and the fine-tune's defaults per method: how the loss constraint is chosen
(ξ itself, :class:`Relative` to the training loss, or the paper's :class:`Masked` recipe) and the
checks on it. :mod:`oodunleash.config` builds the wrapper's options on these.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from oodunleash.masks.layer_masks import check_keep_ratio

__all__ = [
    "DEFAULT_CONSTRAINT_FACTOR",
    "DEFAULT_CONSTRAINT_KEEP_RATIO",
    "METHOD_DEFAULTS",
    "ConstraintSpec",
    "Masked",
    "MethodOptions",
    "Relative",
    "check_constraint",
    "check_ratio",
    "check_loss_constraint",
    "explicit_constraint",
    "real_number",
    "short_constraint",
]

#: The library's default ξ, as a multiple of the model's own training loss. Chosen on proxy-OOD
#: validation data over three model set-ups (``docs/tutorials/tune.md``); it was 3.0 before.
DEFAULT_CONSTRAINT_FACTOR: float = 2.0

#: Keep ratio of the random mask the paper's ξ recipe applies (the reference's value).
DEFAULT_CONSTRAINT_KEEP_RATIO: float = 0.965

#: Fine-tune defaults per method (see the benchmark page for how they were chosen). UMAP's
#: mask options differ from the reference (keep 80% of each layer, every weight frozen).
#: ``keep_ratio``, ``mask_mode`` and ``mask_init`` apply to UMAP only.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "um": {
        "epochs": 10,
        "lr": 0.01,
        "weight_decay": 5e-4,
        "keep_ratio": 0.8,
        "mask_mode": "layer",
        "train_norms": False,
    },
    "umap": {
        "epochs": 10,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "keep_ratio": 0.9,
        "mask_mode": "model",
        "mask_init": "random",
        "train_norms": True,
    },
}


def real_number(value: Any, name: str) -> float:
    """``value`` as a Python float: ints, floats, numpy scalars and one-element tensors count;
    ``bool`` and anything else is a ``TypeError`` naming ``name``.

    Example:
        >>> import numpy as np, torch
        >>> real_number(np.float32(0.5), "x"), real_number(torch.tensor(2), "x")
        (0.5, 2.0)
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


def check_loss_constraint(value: Any) -> float:
    """Validate a user-given ξ: a positive, finite number (a mean cross-entropy).

    Example:
        >>> check_loss_constraint(0.25)
        0.25
    """
    try:
        xi = real_number(value, "loss_constraint (ξ)")
    except TypeError:
        xi = math.nan
    if not xi > 0 or xi == math.inf:
        raise ValueError(
            f"loss_constraint (ξ) must be a positive, finite number (a mean cross-entropy), got "
            f"{value!r}. Leave it out to set it from the training data (constraint='relative')."
        )
    return xi


def check_ratio(value: Any, name: str) -> float:
    """``value`` as a keep ratio in (0, 1]; a ``ValueError`` naming ``name`` otherwise."""
    try:
        ratio = real_number(value, name)
    except TypeError as exc:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.") from exc
    try:
        return check_keep_ratio(ratio)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class Relative:
    """ξ recipe: ``factor`` x the model's mean ID training cross-entropy (eval mode). The
    default recipe; the string ``"relative"`` is ``Relative()``.

    Example:
        >>> Relative(2.5)
        Relative(factor=2.5)
    """

    factor: float = DEFAULT_CONSTRAINT_FACTOR

    def __post_init__(self) -> None:
        factor = real_number(self.factor, "Relative.factor")
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"Relative.factor must be a positive number, got {self.factor!r}.")
        object.__setattr__(self, "factor", factor)


@dataclass(frozen=True)
class Masked:
    """ξ recipe of the paper: the mean ID training cross-entropy with a random
    ``1 - keep_ratio`` of each chosen layer masked (eval mode). ``"masked"`` is ``Masked()``.

    Example:
        >>> Masked(keep_ratio=0.9)
        Masked(keep_ratio=0.9)
    """

    keep_ratio: float = DEFAULT_CONSTRAINT_KEEP_RATIO

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_ratio", check_ratio(self.keep_ratio, "Masked.keep_ratio"))


#: How ξ is chosen: a number, ``"relative"``, ``"masked"``, :class:`Relative` or
#: :class:`Masked` (or the mapping :meth:`UnleashConfig.to_dict` writes for them).
ConstraintSpec = float | str | Relative | Masked | Mapping[str, Any]

_RECIPES: dict[str, type[Relative] | type[Masked]] = {"relative": Relative, "masked": Masked}


def check_constraint(value: Any) -> float | Relative | Masked:
    """The typed form of a ``constraint`` option (a float, :class:`Relative` or :class:`Masked`).

    Example:
        >>> check_constraint("masked"), check_constraint(0.2)
        (Masked(keep_ratio=0.965), 0.2)
    """
    if isinstance(value, Relative | Masked):
        return value
    if isinstance(value, str):
        if value not in _RECIPES:
            raise ValueError(
                f"constraint must be 'relative' or 'masked' (or ξ itself, a number), got {value!r}."
            )
        return _RECIPES[value]()
    if isinstance(value, Mapping):
        options = dict(value)
        recipe = _RECIPES.get(options.pop("recipe", None))
        if recipe is None:
            raise ValueError(
                f"constraint as a mapping needs 'recipe': 'relative' or 'masked', got {value!r}."
            )
        try:
            return recipe(**options)
        except TypeError as exc:
            raise ValueError(f"constraint {value!r}: {exc}") from None
    try:
        real_number(value, "constraint")
    except TypeError:
        raise ValueError(
            f"constraint must be a number (ξ itself), 'relative', 'masked', Relative(factor) or "
            f"Masked(keep_ratio), got {value!r}."
        ) from None
    return check_loss_constraint(value)


def short_constraint(value: float | Relative | Masked) -> float | str | Relative | Masked:
    """The shorthand string for a recipe with its default parameter, else ``value``."""
    if value == Relative():
        return "relative"
    if value == Masked():
        return "masked"
    return value


def explicit_constraint(value: ConstraintSpec) -> float | dict[str, Any]:
    """``value`` in the JSON form that names every parameter: ξ itself, or the recipe with its
    factor or keep ratio. What a checkpoint records, so that a file keeps its meaning when a
    later release changes a recipe's default.

    Example:
        >>> explicit_constraint("relative")
        {'recipe': 'relative', 'factor': 2.0}
        >>> explicit_constraint(0.2)
        0.2
    """
    recipe = check_constraint(value)
    if isinstance(recipe, Relative | Masked):
        name = "relative" if isinstance(recipe, Relative) else "masked"
        return {"recipe": name, **dataclasses.asdict(recipe)}
    return recipe


class MethodOptions(Protocol):
    """What a fit reads of the wrapper's options (:class:`oodunleash.config.UnleashConfig` is
    one): the method, how ξ is chosen, which layers the mask covers and how it starts."""

    method: str
    constraint: ConstraintSpec
    layers: Any
    exclude: Any
    keep_ratio: float | None
    mask_mode: str | None
    mask_init: str | None
    seed: int | None

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON, as a checkpoint and a resume state record them."""
        ...
