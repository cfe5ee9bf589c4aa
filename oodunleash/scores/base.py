"""The :class:`OODScore` interface and the registry of scores by name.

Convention used by every score in this package: **higher = more in-distribution**. A score is
a small object that says what it needs from the model (``requires``), optionally learns
something from ID training data (``fit``) and maps a :class:`~oodunleash.features.collect.FeatureSet`
to one value per sample (``score``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from oodunleash.features.feature_set import FeatureSet, check_score_output

__all__ = [
    "REQUIREMENTS",
    "OODScore",
    "ScoreNotFittedError",
    "check_score_output",
    "get_score",
    "list_scores",
    "register_score",
    "score_grids",
    "unregister_score",
]

#: What a score may ask for. ``logits``: model outputs; ``features``: penultimate features (the
#: classifier head's input); ``feature_maps``: pre-pool feature maps; ``gradients``: the images
#: and a differentiable model (the score runs the model itself); ``labels``: class labels of
#: the ID training data (for ``fit``); ``head``: the last layer's weight and bias.
REQUIREMENTS: frozenset[str] = frozenset(
    {"logits", "features", "feature_maps", "gradients", "labels", "head"}
)


class ScoreNotFittedError(ValueError, AttributeError):
    """Raised when a score that learns from ID training data is used before it was fitted."""


class OODScore:
    """Base class of OOD scores. **Higher scores mean more in-distribution.**

    Subclasses set the class attributes ``name``, ``requires`` and ``needs_fit``, implement
    :meth:`score` (and :meth:`fit` when ``needs_fit``), take their hyper-parameters as keyword
    arguments of ``__init__`` stored under the same attribute names (that is what
    :meth:`get_config` reads), and list the attributes that hold fitted tensors in
    ``state_keys`` (that is what :meth:`state_dict` saves).

    A fitted score is shared by every thread scoring with it, so :meth:`score` must only read
    the fitted state (never store per-call results on ``self``); :meth:`fit` is not meant to
    run while other threads score.

    Example:
        >>> import torch
        >>> from oodunleash.features.feature_set import FeatureSet, check_score_output
        >>> class NegMinLogit(OODScore):
        ...     name = "neg_min_logit"
        ...     requires = frozenset({"logits"})
        ...     def score(self, data):
        ...         return -data.require("logits", self.name).min(dim=1).values
        >>> NegMinLogit().score(FeatureSet(logits=torch.tensor([[1.0, -2.0], [0.0, 3.0]])))
        tensor([2., -0.])
    """

    #: Registry name (lower-case).
    name: ClassVar[str] = ""
    #: Subset of :data:`REQUIREMENTS`.
    requires: ClassVar[frozenset[str]] = frozenset()
    #: Whether :meth:`fit` must run on ID training data before :meth:`score`.
    needs_fit: ClassVar[bool] = False
    #: Attributes holding fitted tensors (saved by :meth:`state_dict`).
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: The hyperparameter worth choosing on validation: ``(option, label prefix, values)``,
    #: the format of :data:`oodunleash.tuning.SCORE_GRID`; ``None`` when the default serves.
    grid: ClassVar[tuple[str, str, tuple[Any, ...]] | None] = None

    def fit(self, data: FeatureSet) -> OODScore:
        """Learn from ID training data (a no-op unless the score ``needs_fit``). Returns self."""
        return self

    def score(self, data: FeatureSet) -> Tensor:
        """One score per sample of ``data``, a 1-D tensor; higher = more in-distribution."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(data).")

    # ------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        """True when the score can be used: it needs no fit, or its fitted state is present."""
        return not self.needs_fit or all(
            getattr(self, k, None) is not None for k in self.state_keys
        )

    def check_fitted(self) -> None:
        """Raise :class:`ScoreNotFittedError` naming the fix when the score is not fitted."""
        if not self.is_fitted:
            raise ScoreNotFittedError(
                f"The {self.name!r} score learns from in-distribution training data and has not "
                f"been fitted: call unleashed.fit_scores(train_loader, scores=[{self.name!r}]) "
                f"first (or score.fit(FeatureSet(...)) when using it directly)."
            )

    def get_config(self) -> dict[str, Any]:
        """The hyper-parameters (the ``__init__`` keyword arguments), JSON-able."""
        config = {}
        for param in inspect.signature(type(self).__init__).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(self, param.name, param.default)
            config[param.name] = list(value) if isinstance(value, tuple) else value
        return config

    def state_dict(self) -> dict[str, Tensor]:
        """Fitted tensors (CPU, contiguous); empty when unfitted or stateless."""
        state = {}
        for key in self.state_keys:
            value = getattr(self, key, None)
            if isinstance(value, Tensor):
                state[key] = value.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> OODScore:
        """Restore fitted tensors saved by :meth:`state_dict`; the score is then ready to use."""
        unknown = set(state) - set(self.state_keys)
        missing = [k for k in self.state_keys if k not in state]
        if unknown or (missing and self.needs_fit):
            raise ValueError(
                f"State for the {self.name!r} score does not match: expected keys "
                f"{list(self.state_keys)}, got {sorted(state)}."
            )
        for key, value in state.items():
            setattr(self, key, torch.as_tensor(value))
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        fitted = "" if not self.needs_fit else (", fitted" if self.is_fitted else ", not fitted")
        return f"{type(self).__name__}({args}){fitted}"


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[OODScore] | OODScore] = {}
_ALIASES: dict[str, str] = {}

S = TypeVar("S")


def positive_option(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A score's hyperparameter ``value`` as a float, refused with its name unless it is
    positive (or zero, with ``allow_zero``)."""
    number = float(value)
    if not (number >= 0 if allow_zero else number > 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {kind}, got {value}.")
    return number


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_definition(cls: type[OODScore], name: str) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered.")
    bad = set(cls.requires) - REQUIREMENTS
    if bad:
        raise ValueError(
            f"Score {name!r} requires unknown inputs {sorted(bad)}; choose from "
            f"{sorted(REQUIREMENTS)}."
        )


def _function_score(
    func: Callable[[FeatureSet], Tensor], name: str, requires: Iterable[str]
) -> type[OODScore]:
    """Wrap ``func(data) -> Tensor`` into a stateless score class."""
    attrs = {
        "name": name,
        "requires": frozenset(requires),
        "score": lambda self, data: func(data),
        "__doc__": func.__doc__,
    }
    return type(f"FunctionScore_{name}", (OODScore,), attrs)


def register_score(
    obj: Any = None,
    *,
    name: str | None = None,
    requires: Iterable[str] | None = None,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> Any:
    """Register a score under its name so that ``score="name"`` finds it.

    Use it as a class decorator (``@register_score``), call it with a class or an instance
    (``register_score(MyScore(k=5))``: :func:`get_score` then returns copies of that
    configuration), or decorate a plain function ``data -> Tensor`` giving ``name`` and
    ``requires``. Registering a taken name raises unless ``overwrite=True``.

    Example:
        >>> import torch
        >>> from oodunleash.features.feature_set import FeatureSet, check_score_output
        >>> @register_score(name="neg_logit_std", requires={"logits"}, overwrite=True)
        ... def neg_logit_std(data):
        ...     return -data.logits.std(dim=1)
        >>> "neg_logit_std" in list_scores()
        True
        >>> get_score("neg_logit_std").score(FeatureSet(logits=torch.ones(2, 3)))
        tensor([-0., -0.])
        >>> unregister_score("neg_logit_std")
    """
    if isinstance(obj, str):  # @register_score("name", ...)
        return register_score(name=obj, requires=requires, aliases=aliases, overwrite=overwrite)
    if obj is None:
        return lambda target: register_score(
            target, name=name, requires=requires, aliases=aliases, overwrite=overwrite
        )

    if isinstance(obj, type) and issubclass(obj, OODScore):
        entry: type[OODScore] | OODScore = obj
        cls = obj
        if name is not None and name != obj.name:
            cls = entry = type(obj.__name__, (obj,), {"name": name})
    elif isinstance(obj, OODScore):
        entry = copy.deepcopy(obj)
        cls = type(obj)
        if name is not None:
            entry.name = name  # instance attribute shadows the class default
    elif callable(obj):
        if name is None:
            name = getattr(obj, "__name__", None)
        if requires is None:
            raise ValueError(
                f"Registering the function {name!r} as a score needs requires=..., e.g. "
                "requires={'logits'}."
            )
        cls = entry = _function_score(obj, name, requires)
    else:
        raise TypeError(
            "register_score takes an OODScore subclass, an OODScore instance or a function "
            f"data -> Tensor; got {type(obj).__name__}."
        )
    key = _normalise(name if name is not None else cls.name)
    _check_definition(cls, key)
    if not overwrite and (key in _REGISTRY or key in _ALIASES):
        raise ValueError(
            f"An OOD score named {key!r} is already registered; pass overwrite=True to replace "
            "it or choose another name."
        )
    _REGISTRY[key] = entry
    _ALIASES.pop(key, None)
    for alias in aliases:
        _ALIASES[_normalise(alias)] = key
    return obj


def unregister_score(name: str) -> None:
    """Remove a registered score (and its aliases)."""
    key = _canonical(name)
    del _REGISTRY[key]
    for alias in [a for a, k in _ALIASES.items() if k == key]:
        del _ALIASES[alias]


def list_scores() -> list[str]:
    """Names of the registered scores, sorted.

    Example:
        >>> {"msp", "energy", "vim", "knn"} <= set(list_scores())
        True
    """
    return sorted(_REGISTRY)


def score_grids() -> dict[str, tuple[str, str, tuple[Any, ...]]]:
    """``{name: (option, label prefix, values)}`` of the registered scores that declare a
    :attr:`OODScore.grid`, for ``tune``'s variants.

    Example:
        >>> score_grids()["scale"]
        ('percentile', 'p', (65.0, 85.0, 95.0))
    """
    grids = {}
    for key, entry in _REGISTRY.items():
        grid = getattr(entry, "grid", None)
        if grid is not None:
            grids[key] = grid
    return grids


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"A score name must be a string, got {type(name).__name__}.")
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown OOD score {name!r}. Registered scores: {', '.join(list_scores())}. "
            "Register your own with oodunleash.scores.register_score."
        )
    return key


def get_score(name: str, **config: Any) -> OODScore:
    """A new instance of the score registered as ``name``, configured by ``config``.

    Example:
        >>> get_score("energy", temperature=2.0)
        Energy(temperature=2.0)
    """
    key = _canonical(name)
    entry = _REGISTRY[key]
    try:
        if isinstance(entry, OODScore):
            if not config:
                return copy.deepcopy(entry)
            instance = type(entry)(**{**entry.get_config(), **config})
            if instance.name != entry.name:
                instance.name = entry.name
            return instance
        return entry(**config)
    except TypeError as err:
        cls = entry if isinstance(entry, type) else type(entry)
        options = list(inspect.signature(cls.__init__).parameters)[1:]
        raise TypeError(
            f"Bad configuration for the {key!r} score: {err}. Its options are: "
            f"{', '.join(options) or 'none'}."
        ) from err
