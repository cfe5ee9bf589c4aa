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
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from oodunleash.finetune.recipes import (
    DEFAULT_CONSTRAINT_FACTOR,
    METHOD_DEFAULTS,
    ConstraintSpec,
    Masked,
    Relative,
    check_constraint,
    check_loss_constraint,
    check_ratio,
    explicit_constraint,
    real_number,
    short_constraint,
)
from oodunleash.masks.layer_masks import LayerSelector
from oodunleash.scores import OODScore, resolve_score
from oodunleash.scores.spec import ScoreSpec

__all__ = [
    "DEFAULT_CONSTRAINT_FACTOR",
    "METHOD_DEFAULTS",
    "ConstraintSpec",
    "Masked",
    "Relative",
    "UnleashConfig",
    "check_loss_constraint",
    "explicit_constraint",
    "real_number",
]

Method = Literal["um", "umap"]

#: The wrapper attribute of an option whose name is taken by a method there (``score``).
_ATTRIBUTE = {"score": "default_score"}

#: Options that shape the UMAP mask; UM (which fine-tunes the dense weights) refuses them.
UMAP_ONLY: tuple[str, ...] = ("keep_ratio", "mask_mode", "mask_init")


#: What ``constraint="relative"`` meant in release 0.1 (the default ξ factor then).
_RELEASE_0_1_FACTOR = 3.0


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
            set_(self, "keep_ratio", check_ratio(self.keep_ratio, "keep_ratio"))
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
