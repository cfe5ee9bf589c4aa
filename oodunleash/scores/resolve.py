"""From what a user writes to score instances: a registered name, a label with options
(``"knn k=1"``), a :class:`~oodunleash.scores.spec.ScoreSpec`, an instance or a class, alone,
in a list or in a ``{label: score}`` dict, matched with the fitted copies a wrapper holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from oodunleash.scores.base import OODScore, get_score
from oodunleash.scores.spec import FUSED_JOIN, ScoreSpec

__all__ = ["resolve_score", "resolve_scores"]


def _is_label(name: str) -> bool:
    """Whether ``name`` carries options, as ``ScoreSpec.label`` writes them (``"knn k=1"``,
    or fused members ``"knn + energy"``)."""
    return ("=" in name or FUSED_JOIN.strip() in name.split()) and len(name.split()) > 1


def resolve_score(spec: Any) -> OODScore:
    """An :class:`OODScore` instance from a registered name, a label with options
    (``"knn k=1"``), a :class:`~oodunleash.scores.spec.ScoreSpec`, an instance or a class."""
    if isinstance(spec, OODScore):
        return spec
    if isinstance(spec, type) and issubclass(spec, OODScore):
        return spec()
    if isinstance(spec, ScoreSpec):
        return spec.build()
    if isinstance(spec, str):
        return ScoreSpec.parse(spec).build() if _is_label(spec) else get_score(spec)
    raise TypeError(
        f"A score is a registered name (see oodunleash.list_scores()) or an OODScore; got "
        f"{type(spec).__name__}."
    )


def resolve_scores(
    scores: str | OODScore | Sequence[str | OODScore] | Mapping[str, str | OODScore],
    fitted: Mapping[str, OODScore] | None = None,
) -> dict[str, OODScore]:
    """``{label: instance}`` for one score, several, or ``{label: score}``.

    A name that is a key of ``fitted`` (a score's name, or a label it was fitted under)
    resolves to that fitted instance and keeps that key as its label, so variants fitted as
    ``{"knn5": KNN(k=5), "knn10": KNN(k=10)}`` come back under their labels when asked for by
    label. Other names resolve to the fitted instance of their score when there is one, else
    to a new instance. Two results under one label are refused.

    Example:
        >>> fitted = {"knn5": get_score("knn", k=5), "knn10": get_score("knn", k=10)}
        >>> {label: s.k for label, s in resolve_scores(["knn5", "knn10"], fitted).items()}
        {'knn5': 5, 'knn10': 10}
    """
    fitted = fitted or {}
    out: dict[str, OODScore] = {}
    for label, spec in _labelled_specs(scores):
        if isinstance(spec, str) and spec not in fitted and _is_label(spec):
            spec = ScoreSpec.parse(spec)
        if isinstance(spec, ScoreSpec):  # its fitted copy, under whatever key it was stored
            found = spec.find(fitted)
            key, instance = found if found is not None else (spec.label, spec.build())
            label = label or key
        elif not isinstance(spec, str):
            instance = resolve_score(spec)
        elif label in fitted:
            instance = fitted[label]
        elif spec in fitted:  # a name, or a label given to fit_scores: it stays the label
            instance, label = fitted[spec], label or spec
        else:
            instance = get_score(spec)
            instance = fitted.get(instance.name, instance)
        key = label or instance.name
        if key in out:
            raise ValueError(
                f"Two scores are named {key!r}, so one would hide the other's results. "
                f"Label them with a dict, e.g. {{'{key}_a': ..., '{key}_b': ...}}."
            )
        out[key] = instance
    return out


def _labelled_specs(scores: Any) -> list[tuple[str | None, Any]]:
    """``(label, spec)`` pairs; the label is ``None`` where the score's name serves."""
    if isinstance(scores, str | OODScore | ScoreSpec) or (
        isinstance(scores, type) and issubclass(scores, OODScore)
    ):
        return [(None, scores)]
    if not isinstance(scores, Iterable):
        raise TypeError(
            "scores must be a registered name (see list_scores()), an OODScore, a list of them "
            f"or a {{label: score}} dict; got {type(scores).__name__}."
        )
    if isinstance(scores, Mapping):
        bad = [label for label in scores if not isinstance(label, str) or not label]
        if bad:
            raise TypeError(f"Score labels must be non-empty strings, got {bad!r}.")
        pairs: list[tuple[str | None, Any]] = list(scores.items())
    else:
        pairs = [(None, spec) for spec in scores]
    if not pairs:
        raise ValueError("scores is empty: name at least one score (see list_scores()).")
    return pairs
