"""The options of :class:`~oodunleash.OODUnleash`: one home for their defaults and checks.

:class:`UnleashConfig` holds every constructor option. The wrapper, checkpoints, the CLI and
the benchmark read the same defaults (:data:`METHOD_DEFAULTS`) and the same validation, so
an option means one thing everywhere and a wrong one fails at the boundary with the name of
the option and the fix.

How ξ is chosen is one option, ``constraint``: a number (ξ itself), :class:`Relative`
(``"relative"``, the default: a multiple of the model's training loss) or :class:`Masked`
(``"masked"``: the paper's recipe, the training loss with a small random part of the chosen
layers masked).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from .masking import LayerSelector, check_keep_ratio
from .scores import OODScore, resolve_score
from .scores.spec import ScoreSpec

__all__ = [
    "DEFAULT_CONSTRAINT_FACTOR",
    "METHOD_DEFAULTS",
    "ConstraintSpec",
    "Masked",
    "Relative",
    "UnleashConfig",
    "check_loss_constraint",
    "constraint_with_aliases",
    "explicit_constraint",
    "real_number",
]

Method = Literal["um", "umap"]

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

#: The wrapper attribute of an option whose name is taken by a method there (``score``).
_ATTRIBUTE = {"score": "default_score"}

#: Options that shape the UMAP mask; UM (which fine-tunes the dense weights) refuses them.
UMAP_ONLY: tuple[str, ...] = ("keep_ratio", "mask_mode", "mask_init")


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


def _keep_ratio(value: Any, name: str) -> float:
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
        object.__setattr__(self, "keep_ratio", _keep_ratio(self.keep_ratio, "Masked.keep_ratio"))


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


#: What ``constraint="relative"`` meant in release 0.1 (the default ξ factor then).
_RELEASE_0_1_FACTOR = 3.0

#: Deprecated wrapper options and attributes: ``{alias: (recipe, its field)}``.
_RECIPE_ALIASES: dict[str, tuple[type[Relative] | type[Masked], str]] = {
    "constraint_factor": (Relative, "factor"),
    "constraint_keep_ratio": (Masked, "keep_ratio"),
}


def constraint_with_aliases(
    constraint: ConstraintSpec, factor: Any, keep_ratio: Any
) -> ConstraintSpec:
    """``constraint`` with the deprecated ``constraint_factor`` / ``constraint_keep_ratio``
    folded in (each warns); an alias for the other recipe is refused unless it is that
    recipe's default.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     constraint_with_aliases("relative", 2.5, 0.965)
        Relative(factor=2.5)
    """
    typed = check_constraint(constraint)
    given = {"constraint_factor": factor, "constraint_keep_ratio": keep_ratio}
    for alias, (recipe, field) in _RECIPE_ALIASES.items():
        value = given[alias]
        if value is None:
            continue
        name = recipe.__name__
        warnings.warn(
            f"OODUnleash({alias}=...) is deprecated: pass constraint={name}({field}=...).",
            DeprecationWarning,
            stacklevel=3,
        )
        wanted = recipe(**{field: value})
        if isinstance(typed, recipe):
            typed = wanted
        elif wanted != recipe():
            raise ValueError(
                f"{alias} applies to constraint={name.lower()!r}, not {constraint!r}: pass "
                f"constraint={name}({field}={value!r})."
            )
    return short_constraint(typed)


def deprecated_recipe_attribute(name: str) -> property:
    """The wrapper's read-only attribute ``name`` (a key of the deprecated aliases): the
    alias's field of the wrapper's constraint when that is the alias's recipe, else the
    recipe's default."""
    recipe, field = _RECIPE_ALIASES[name]

    def get(self: Any) -> float:
        message = f"OODUnleash.{name} is deprecated: read unleashed.config.loss_constraint."
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        spec = check_constraint(self.constraint)
        return getattr(spec if isinstance(spec, recipe) else recipe(), field)

    return property(get, doc=f"Deprecated: the {field} of a :class:`{recipe.__name__}` constraint.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        wanted = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")


def _check_selector(name: str, value: Any) -> None:
    if value is None:
        return
    items = [value] if isinstance(value, str | type) else value
    if not isinstance(items, Sequence) or not all(isinstance(i, str | type) for i in items):
        raise TypeError(
            f"{name} must be a name glob ('layer4.*'), an nn.Module type, or a list of them; got "
            f"{value!r}."
        )


def _names_types(selector: Any) -> bool:
    items = [selector] if isinstance(selector, str | type) else selector or []
    return any(isinstance(item, type) for item in items)


def _score_to_json(score: str | OODScore | ScoreSpec) -> str | dict[str, Any]:
    """A name, or ``{"name", "config"}`` with the options that differ from the defaults
    (:meth:`ScoreSpec.to_json`); an unregistered score's whole config."""
    if isinstance(score, str):
        return score
    try:
        return ScoreSpec.of(score).to_json()
    except (TypeError, ValueError):  # not registered: the name alone would not rebuild it
        return {"name": score.name, "config": score.get_config()}


@dataclass(frozen=True)
class UnleashConfig:
    """Every option of :class:`~oodunleash.OODUnleash` but the model, validated on creation.

    ``keep_ratio``, ``mask_mode`` and ``mask_init`` shape UMAP's mask: ``None`` means the
    method's default (:data:`METHOD_DEFAULTS`), and UM refuses any other value. Numbers may be
    numpy or one-element torch scalars. :meth:`resolve` fills the method's defaults in.

    Example:
        >>> config = UnleashConfig("umap", keep_ratio=0.8).resolve()
        >>> config.mask_mode, config.constraint
        ('model', 'relative')
        >>> UnleashConfig.from_dict(config.to_dict()) == config
        True
        >>> UnleashConfig("um", keep_ratio=0.8)
        Traceback (most recent call last):
        ...
        ValueError: keep_ratio applies to method='umap' (it shapes the learnt mask); UM fine-tunes every weight. Drop keep_ratio, or use method='umap'.
    """

    method: Method = "um"
    layers: LayerSelector | None = None
    exclude: LayerSelector | None = None
    keep_ratio: float | None = None
    mask_mode: Literal["layer", "model"] | None = None
    mask_init: Literal["random", "magnitude"] | None = None
    constraint: ConstraintSpec = "relative"
    score: str | OODScore | ScoreSpec = "knn"
    seed: int = 0
    head: str | None = None
    feature_layer: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        _check_choice("method", self.method, ("um", "umap"))
        if self.method == "um":
            for name in UMAP_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to method='umap' (it shapes the learnt mask); UM "
                        f"fine-tunes every weight. Drop {name}, or use method='umap'."
                    )
        if self.keep_ratio is not None:
            set_(self, "keep_ratio", _keep_ratio(self.keep_ratio, "keep_ratio"))
        _check_choice("mask_mode", self.mask_mode, ("layer", "model"))
        _check_choice("mask_init", self.mask_init, ("random", "magnitude"))
        _check_selector("layers", self.layers)
        _check_selector("exclude", self.exclude)
        set_(self, "constraint", short_constraint(check_constraint(self.constraint)))
        score = self.score
        if isinstance(score, Mapping):  # a configured score, as a checkpoint records it
            score = ScoreSpec.from_json(score)
        elif isinstance(score, str) and len(score.split()) > 1:  # a label: "knn k=1"
            score = ScoreSpec.parse(score)
        resolve_score(score)  # an unknown name fails here, not at the first score() call
        set_(self, "score", score)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(
                f"seed must be an int (it seeds the masks and the fine-tune), got "
                f"{self.seed!r}. Pass e.g. seed=0."
            )
        set_(self, "seed", int(self.seed))
        for name in ("head", "feature_layer"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise TypeError(
                    f"{name} must be the name of a submodule (e.g. 'fc'), got {value!r}."
                )

    def set_attributes(self, owner: Any) -> None:
        """Store each option as an attribute of ``owner`` (the wrapper; ``score`` goes to
        ``default_score``, since ``score`` is a method there)."""
        for field in dataclasses.fields(self):
            setattr(owner, _ATTRIBUTE.get(field.name, field.name), getattr(self, field.name))

    @classmethod
    def from_attributes(cls, owner: Any) -> UnleashConfig:
        """The options stored on ``owner`` by :meth:`set_attributes` (checked again)."""
        fields = dataclasses.fields(cls)
        return cls(**{f.name: getattr(owner, _ATTRIBUTE.get(f.name, f.name)) for f in fields})

    def resolve(self) -> UnleashConfig:
        """This config with the method's defaults in place of ``None``."""
        if self.method == "um":
            return self
        defaults = METHOD_DEFAULTS["umap"]
        return dataclasses.replace(
            self, **{k: defaults[k] for k in UMAP_ONLY if getattr(self, k) is None}
        )

    @property
    def loss_constraint(self) -> float | Relative | Masked:
        """``constraint`` in its typed form."""
        return check_constraint(self.constraint)

    def to_dict(self, layer_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able options: ``UnleashConfig.from_dict(c.to_dict()) == c``. Layer selectors
        naming module types have no JSON form: they are replaced by ``layer_names`` (the layers
        they chose), or refused when none are given."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if any(_names_types(out[name]) for name in ("layers", "exclude")):
            if layer_names is None:
                raise TypeError(
                    f"layers={self.layers!r}, exclude={self.exclude!r} select module types, "
                    "which have no JSON form; pass layer_names, or select layers by name."
                )
            out["layers"], out["exclude"] = list(layer_names), None
        for name in ("layers", "exclude"):
            if out[name] is not None and not isinstance(out[name], str):
                out[name] = list(out[name])
        if isinstance(out["constraint"], Relative | Masked):
            out["constraint"] = explicit_constraint(out["constraint"])
        out["score"] = _score_to_json(out["score"])
        return out

    @classmethod
    def from_legacy(cls, data: Mapping[str, Any]) -> UnleashConfig:
        """The options recorded by a checkpoint of oodunleash 0.1 (``oodunleash_config.json``
        before this config existed): ``constraint_factor`` / ``constraint_keep_ratio`` fold
        into ``constraint``, UM's mask options (recorded but unused) are dropped, the masked
        ``layer_names`` stand for the selection, ``default_score`` is ``score``.

        Example:
            >>> UnleashConfig.from_legacy({"method": "um", "keep_ratio": 0.8,
            ...     "constraint": "relative", "constraint_factor": 2.5, "layer_names": ["fc"]})
            UnleashConfig(method='um', layers=['fc'], exclude=None, keep_ratio=None, mask_mode=None, mask_init=None, constraint=Relative(factor=2.5), score='energy', seed=0, head=None, feature_layer=None)
            >>> UnleashConfig.from_legacy({"method": "um"}).constraint  # 0.1's default was 3x
            Relative(factor=3.0)
        """
        method = data.get("method", "um")
        recipe = check_constraint(data.get("constraint") or "relative")
        if isinstance(recipe, Relative):  # release 0.1's "relative" meant 3x when unrecorded
            recipe = Relative(data.get("constraint_factor") or _RELEASE_0_1_FACTOR)
        if isinstance(recipe, Masked) and data.get("constraint_keep_ratio") is not None:
            recipe = Masked(data["constraint_keep_ratio"])
        options = {
            "method": method,
            "layers": list(data.get("layer_names") or []) or None,
            "constraint": short_constraint(recipe),
            "score": data.get("default_score", "energy"),
            **{k: data.get(k) for k in ("head", "feature_layer") if data.get(k) is not None},
        }
        if data.get("seed") is not None:
            options["seed"] = data["seed"]
        if method == "umap":
            options.update({k: data.get(k) for k in UMAP_ONLY})
        return cls.from_dict(options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnleashConfig:
        """The config :meth:`to_dict` wrote; an unknown or invalid field is a ``ValueError``
        naming it."""
        if not isinstance(data, Mapping):
            raise TypeError(f"An UnleashConfig is read from a mapping, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} in the OODUnleash config; known: {sorted(known)}."
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Invalid OODUnleash config: {exc}") from exc
