"""Which weights of a model get a mask: the default set of layer types, name globs and module
types, and the weights that ``nn.MultiheadAttention`` holds itself. The public names are
documented and imported through :mod:`oodunleash.masks.layer_masks`."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerSelector",
    "masked_parameters",
    "select_layers",
    "zero_fraction",
]

#: Module types masked when the user names no layers: their ``weight``, and for
#: ``nn.MultiheadAttention`` the input projection (``in_proj_weight``, or ``q/k/v_proj_weight``
#: when keys and values have their own sizes); its ``out_proj`` is an ``nn.Linear``. Subclasses
#: count too (timm's ``StdConv2d``, ``Conv2dSame``).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.MultiheadAttention,
)

#: Weight parameters of ``nn.MultiheadAttention`` itself (not of a child module).
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: A layer selection: a name glob (``"layer4.*"``), a module type, or a sequence of both.
LayerSelector = str | type[nn.Module] | Sequence[str | type[nn.Module]]


# --------------------------------------------------------------------------- layer selection
def _as_rules(selector: LayerSelector | None) -> tuple[list[str], list[type]]:
    if selector is None:
        return [], []
    items = [selector] if isinstance(selector, str | type) else list(selector)
    globs, types = [], []
    for item in items:
        if isinstance(item, str):
            globs.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"Layer selectors are name globs (str) or nn.Module subclasses; got {item!r}."
            )
    return globs, types


def _matches(name: str, module: nn.Module, globs: list[str], types: list[type]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs) or isinstance(module, tuple(types))


def _is_maskable(weight: object) -> bool:
    # Lazy modules have no shape yet; masking them would freeze a placeholder.
    return (
        isinstance(weight, nn.Parameter)
        and not isinstance(weight, nn.parameter.UninitializedParameter)
        and weight.dim() >= 2
    )


def _join(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def masked_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every weight a mask can apply to: ``{layer name: (module, parameter name)}``.

    A module's 2-D-or-more ``weight`` is listed under the module's name; an
    ``nn.MultiheadAttention`` projection under ``"<module name>.in_proj_weight"`` (or
    ``q_proj_weight``, ...), since the module holds it itself.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.MultiheadAttention(4, 2))
        >>> list(masked_parameters(net))
        ['0', '1.in_proj_weight', '1.out_proj']
    """
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if _is_maskable(module._parameters.get("weight")):
            found[name] = (module, "weight")
        if isinstance(module, nn.MultiheadAttention):
            for param in _ATTENTION_WEIGHTS:
                if _is_maskable(module._parameters.get(param)):
                    found[_join(name, param)] = (module, param)
    return found


def zero_fraction(weights: Iterable[Tensor]) -> float:
    """Share of exact zeros over all ``weights`` together (0.0 when there are none).

    Example:
        >>> zero_fraction([torch.tensor([0.0, 1.0]), torch.zeros(2)])
        0.75
    """
    zeros = total = 0
    for weight in weights:
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


def _weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns a weight a mask can apply to, by layer name."""
    return {name: module for name, (module, _) in masked_parameters(model).items()}


def select_layers(
    model: nn.Module,
    layers: LayerSelector | None = None,
    exclude: LayerSelector | None = None,
) -> dict[str, nn.Module]:
    """Choose the modules whose ``weight`` gets a mask.

    Args:
        model: Any classifier.
        layers: Name globs and/or module types to include. ``None`` means every
            :data:`DEFAULT_LAYER_TYPES` module (``nn.Conv1d/2d/3d``, ``nn.Linear`` and
            ``nn.MultiheadAttention``'s projections, subclasses too); a warning names any other
            module with a weight of two or more dimensions that is left dense
            (``nn.Embedding``, ``nn.ConvTranspose2d``, ...).
        exclude: Name globs and/or module types to leave dense, applied after ``layers``.

    Returns:
        ``{layer name: module}`` in model order. A layer name is the module's qualified
        name, or ``"<module>.in_proj_weight"`` (and ``q/k/v_proj_weight``) for the input
        projection of an ``nn.MultiheadAttention`` (see :func:`masked_parameters`).

    Raises:
        ValueError: if the selection matches nothing; the message lists the available layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 3))
        >>> list(select_layers(net, exclude="2"))
        ['0']
    """
    candidates = _weighted_modules(model)
    inc_globs, inc_types = _as_rules(layers)
    exc_globs, exc_types = _as_rules(exclude)
    if layers is None:
        inc_types = list(DEFAULT_LAYER_TYPES)
    chosen = {
        name: module
        for name, module in candidates.items()
        if _matches(name, module, inc_globs, inc_types)
        and not _matches(name, module, exc_globs, exc_types)
    }
    if layers is None:
        _warn_left_dense(candidates, chosen, exc_globs, exc_types)
    if not chosen:
        available = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates.items())
        raise ValueError(
            f"The layer selection (layers={layers!r}, exclude={exclude!r}) matches no "
            f"parameter. Layers with a weight to mask: {available or 'none'}. "
            "Pass name globs such as 'layer4.*' or module types such as nn.Conv2d."
        )
    return chosen


def _warn_left_dense(
    candidates: dict[str, nn.Module],
    chosen: dict[str, nn.Module],
    exc_globs: list[str],
    exc_types: list[type],
) -> None:
    """The default selection names the weighted layers it leaves dense (those the user
    excluded are left out of the warning: that was asked for)."""
    left = [
        f"{name} ({type(module).__name__})"
        for name, module in candidates.items()
        if name not in chosen and not _matches(name, module, exc_globs, exc_types)
    ]
    if left:
        warnings.warn(
            f"The default layer selection masks nn.Conv1d/2d/3d, nn.Linear and "
            f"nn.MultiheadAttention weights; these weighted layers stay dense: "
            f"{', '.join(left)}. Pass layers= (name globs or module types) to mask them, or "
            "exclude= to silence this.",
            stacklevel=3,
        )
