"""A configured score as data: :class:`ScoreSpec` (registry name + options).

One value serves every place a chosen score travels: the wrapper's default score
(``OODUnleash.default_score``), the checkpoint's config (:meth:`ScoreSpec.to_json`), the CLI
(:meth:`ScoreSpec.label`, :meth:`ScoreSpec.parse`) and :func:`~oodunleash.tune`'s variants
(``"knn k=1"``, ``"react p=90"``). The fitted state stays in ``fitted_scores_``;
:meth:`ScoreSpec.find` finds it there whatever key it was stored under, so a reloaded
checkpoint's default score is the fitted one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from oodunleash.scores.base import OODScore, get_score

__all__ = ["ScoreSpec"]

#: Short option names used in labels (``"dice s=0.9"``); other options keep their name.
SHORT_OPTIONS: dict[str, str] = {"percentile": "p", "sparsity": "s"}
_LONG_OPTIONS = {short: long for long, short in SHORT_OPTIONS.items()}
#: The fused score's registered name, and what joins its members in a label.
FUSED, FUSED_JOIN = "fused", " + "


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | int | bool) or value is None:
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score and the options it differs from its defaults by.

    Built from a name, a label, an instance or a JSON entry (:meth:`of`); compares equal for
    equal configurations (``ScoreSpec("knn", {"k": 50})`` is ``ScoreSpec("knn")``, KNN's default
    ``k``); :meth:`build` makes a new, unfitted instance.

    Attributes:
        name: The canonical registry name (aliases resolved).
        options: The options that differ from the registered defaults (read-only).

    Example:
        >>> spec = ScoreSpec("knn", {"k": 1})
        >>> spec.label, spec.to_json()
        ('knn k=1', {'name': 'knn', 'config': {'k': 1}})
        >>> ScoreSpec.parse("react p=90") == ScoreSpec("react", {"percentile": 90})
        True
        >>> ScoreSpec.of(spec.build()) == spec, ScoreSpec("knn", {"k": 50}).label
        (True, 'knn')
        >>> ScoreSpec.parse("knn k=1 + energy").label
        'knn k=1 + energy'
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise TypeError(
                f"ScoreSpec options must be a mapping {{option: value}}, got {self.options!r}."
            )
        built = get_score(self.name, **dict(self.options))  # checks the name and the options
        defaults = get_score(self.name).get_config()
        config = built.get_config()
        kept = {k: config[k] for k in sorted(config) if config[k] != defaults.get(k)}
        object.__setattr__(self, "name", built.name)
        object.__setattr__(self, "options", MappingProxyType(kept))

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(dict(self.options), sort_keys=True, default=str)))

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and deepcopy: the options as a dict
        return (type(self), (self.name, dict(self.options)))

    def __repr__(self) -> str:
        options = f", {dict(self.options)!r}" if self.options else ""
        return f"ScoreSpec({self.name!r}{options})"

    @property
    def label(self) -> str:
        """``"<name>"``, or ``"<name> <option>=<value> ..."``: the key in tables, in
        ``fitted_scores_`` and on the command line (:meth:`parse` reads it back). A fused
        score that differs from the default only in its members is written as its members'
        labels joined by ``" + "`` (``"knn k=1 + energy"``)."""
        if self.name == FUSED and set(self.options) == {"members"}:
            return FUSED_JOIN.join(ScoreSpec(*m).label for m in self.options["members"])
        parts = [f"{SHORT_OPTIONS.get(k, k)}={_shown(v)}" for k, v in self.options.items()]
        return " ".join([self.name, *parts])

    # ------------------------------------------------------------------ conversions
    @classmethod
    def parse(cls, text: str) -> ScoreSpec:
        """The spec a :attr:`label` describes: ``"knn"``, ``"knn k=1"``, ``"dice s=0.5"``."""
        if not isinstance(text, str) or not text.strip():
            raise TypeError(f"A score label is a non-empty string, got {text!r}.")
        if FUSED_JOIN.strip() in text.split():
            members = [cls.parse(part) for part in re.split(r"\s+\+\s+", text.strip())]
            return cls(FUSED, {"members": [[m.name, dict(m.options)] for m in members]})
        name, *pairs = text.split()
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(
                    f"Cannot read the score {text!r}: write '<name> <option>=<value> ...', "
                    "e.g. 'knn k=1' or 'react p=90'."
                )
            options[_LONG_OPTIONS.get(key, key)] = _parsed(value)
        return cls(name, options)

    @classmethod
    def of(cls, score: str | OODScore | ScoreSpec | Mapping[str, Any]) -> ScoreSpec:
        """The spec of a name or label, a registered score's instance, a spec, or a JSON entry
        written by :meth:`to_json`."""
        if isinstance(score, ScoreSpec):
            return score
        if isinstance(score, str):
            return cls.parse(score)
        if isinstance(score, OODScore):
            return cls(score.name, score.get_config())
        if isinstance(score, Mapping):
            return cls.from_json(score)
        raise TypeError(
            "A score is a registered name or label (see oodunleash.list_scores()), an OODScore "
            f"or a ScoreSpec; got {type(score).__name__}."
        )

    def to_json(self) -> str | dict[str, Any]:
        """The name alone, or ``{"name": ..., "config": {non-default options}}``."""
        return self.name if not self.options else {"name": self.name, "config": dict(self.options)}

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> ScoreSpec:
        """Read :meth:`to_json`'s output (or an older checkpoint's full ``config``)."""
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise ValueError(
                f"A score entry is a name or {{'name': ..., 'config': ...}}: {data!r}."
            )
        return cls(data["name"], dict(data.get("config") or {}))

    def build(self) -> OODScore:
        """A new, unfitted instance."""
        return get_score(self.name, **dict(self.options))

    # ------------------------------------------------------------------ fitted state
    def matches(self, score: OODScore) -> bool:
        """Whether ``score`` is an instance of this configuration."""
        if getattr(score, "name", None) != self.name:
            return False
        try:
            return ScoreSpec.of(score) == self
        except (TypeError, ValueError):
            return False

    def find(self, fitted: Mapping[str, OODScore]) -> tuple[str, OODScore] | None:
        """``(key, instance)`` of this configuration in ``fitted`` (a ``fitted_scores_``):
        under its label first, then its name, then any key; ``None`` when absent."""
        keys = list(dict.fromkeys((self.label, self.name, *fitted)))
        found = [(k, fitted[k]) for k in keys if k in fitted and self.matches(fitted[k])]
        ready = [pair for pair in found if pair[1].is_fitted]  # a fitted copy before a bare one
        return (ready or found or [None])[0]
