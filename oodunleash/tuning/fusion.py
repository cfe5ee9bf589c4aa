"""Fused scores as :func:`~oodunleash.tune` candidates, built from values already computed.

Scores that look at different things (distances in feature space, the energy of the logits,
Mahalanobis) fail on different OOD sets. After a candidate model has been read out by every
single score, :func:`read_fusions` takes its best few score *families* on validation (the best
variant of each), and tries every combination of two or more of them: each member's
validation values z-normalised against its own values on the ID validation images, then
averaged (:func:`~oodunleash.scores.fuse`). No model pass is added: the members' fitted
instances and cached validation values are reused. A fused variant is chosen on validation like
any other, and the chosen one is a fitted :class:`~oodunleash.scores.Fused` that saves and
reloads with the checkpoint.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from oodunleash.evaluation.results import EvaluationResults
from oodunleash.scores import Fused, OODScore
from oodunleash.scores.spec import ScoreSpec
from oodunleash.tuning.result import metrics_in_percent, ranked

__all__ = ["FUSION_METHOD", "family", "fusion_groups", "read_fusions"]

#: The normalisation of fused candidates: z-scores against the ID validation values.
FUSION_METHOD = "z"


def family(label: str, variant: ScoreSpec | OODScore) -> str:
    """The score a variant is a setting of (``"knn"`` for ``"knn k=1"``); an unregistered
    instance is its own family."""
    if isinstance(variant, ScoreSpec):
        return variant.name
    return getattr(variant, "name", label)


def _fusable(variant: ScoreSpec | OODScore) -> bool:
    """Whether a fused score can hold this variant: not a fused score itself, and not one that
    runs the model backwards (its ID reference cannot come from cached features)."""
    score = variant.build() if isinstance(variant, ScoreSpec) else variant
    return score.name != Fused.name and "gradients" not in score.requires


def fusion_groups(
    ranking: Sequence[str], variants: Mapping[str, ScoreSpec | OODScore], top: int
) -> list[tuple[str, ...]]:
    """The member sets to try: every combination of two or more of the ``top`` best families,
    each represented by its best variant. ``ranking`` lists the single variants best first;
    each set lists its members in the order of ``variants``, so one set has one label
    whichever candidate ranked it.

    Example:
        >>> variants = {label: ScoreSpec.parse(label) for label in ["knn k=1", "knn", "vim", "energy"]}
        >>> fusion_groups(["knn k=1", "knn", "vim", "energy"], variants, top=3)
        [('knn k=1', 'vim'), ('knn k=1', 'energy'), ('vim', 'energy'), ('knn k=1', 'vim', 'energy')]
    """
    best: dict[str, str] = {}
    for label in ranking:
        variant = variants[label]
        if _fusable(variant):
            best.setdefault(family(label, variant), label)
    order = {label: i for i, label in enumerate(variants)}
    chosen = sorted(list(best.values())[:top], key=order.__getitem__)
    return [
        group
        for size in range(2, len(chosen) + 1)
        for group in itertools.combinations(chosen, size)
    ]


def read_fusions(
    fitted: Mapping[str, OODScore],
    raw: EvaluationResults,
    variants: Mapping[str, ScoreSpec | OODScore],
    top: int,
) -> tuple[dict[str, Any], dict[str, Fused]]:
    """Fused variants of one candidate from its single scores' cached validation values.

    Args:
        fitted: The candidate's fitted scores (``fitted_scores_``), by label.
        raw: The single scores' validation results, with raw ID and OOD values.
        variants: ``{label: variant}`` of the single scores read out.
        top: How many of the best families to combine; below 2, nothing is fused.

    Returns:
        ``({label: {ood_set: metrics}}, {label: fitted Fused})`` for every combination whose
        fused values are finite; the metrics as fractions, like :attr:`EvaluationResults.metrics`.
    """
    if top < 2:
        return {}, {}
    singles = {label: raw.metrics[label] for label in raw.metrics if label in variants}
    groups = fusion_groups(ranked(metrics_in_percent(singles)), variants, top)
    id_values: dict[str, Any] = {}
    ood_values: dict[str, dict[str, Any]] = {}
    scores: dict[str, Fused] = {}
    for group in groups:
        reference = {m: torch.as_tensor(raw.id_scores[m]) for m in group}
        fused = Fused.from_fitted({m: fitted[m] for m in group}, reference, FUSION_METHOD)
        label = ScoreSpec.of(fused).label  # the members' labels joined by " + "
        if label in variants:  # the registered fused score with these members, read already
            continue
        id_values[label] = fused.combine(list(reference.values()))
        ood_values[label] = {
            ood: fused.combine([torch.as_tensor(raw.ood_scores[m][ood]) for m in group])
            for ood in raw.ood_scores[group[0]]
        }
        every = [id_values[label], *ood_values[label].values()]
        if not all(math.isfinite(float(v.abs().max())) for v in every if v.numel()):
            del id_values[label], ood_values[label]  # an infinite member value: unreadable
            continue
        scores[label] = fused
    if not scores:
        return {}, {}
    return EvaluationResults.from_scores(id_values, ood_values).metrics, scores
