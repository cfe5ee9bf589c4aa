"""How :func:`~oodunleash.tune` reads a candidate model out: every score variant fitted in one
pass over the training data and scored in one pass per validation set, fused variants built
from the cached values (:mod:`~oodunleash.tuning.fusion`), and the best one made the model's
default score."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from oodunleash.evaluation.results import EvaluationResults
from oodunleash.scores import OODScore
from oodunleash.scores.spec import ScoreSpec
from oodunleash.tuning import schedule
from oodunleash.tuning.candidates import CandidateSpec
from oodunleash.tuning.fusion import read_fusions
from oodunleash.tuning.result import CandidateResult, metrics_in_percent
from oodunleash.wrapper import OODUnleash

__all__ = ["Reader", "choose_score", "split_failures"]

T = TypeVar("T")


def split_failures(
    labels: list[str], run: Callable[[list[str]], T]
) -> tuple[list[T], dict[str, Exception]]:
    """``run(labels)``; where that raises, run each half again, down to single labels.

    Returns the results of the groups that ran and ``{label: error}`` for the labels that
    failed alone. One bad score (a NaN on some OOD set, a model it cannot read) then costs a
    few extra passes, not the whole comparison.

    Example:
        >>> def run(labels):
        ...     if "bad" in labels:
        ...         raise ValueError("no")
        ...     return labels
        >>> split_failures(["a", "b", "bad", "c"], run)
        ([['a', 'b'], ['c']], {'bad': ValueError('no')})
    """
    try:
        return [run(labels)], {}
    except Exception as err:  # noqa: BLE001 - isolated below, reported by label
        if len(labels) == 1:
            return [], {labels[0]: err}
    middle = len(labels) // 2
    first, first_failures = split_failures(labels[:middle], run)
    second, second_failures = split_failures(labels[middle:], run)
    return first + second, first_failures | second_failures


def choose_score(
    unleashed: OODUnleash, label: str, variant: ScoreSpec | OODScore, keep_all: bool
) -> None:
    """Make the fitted variant ``label`` the default score of ``unleashed``, in the one form
    that saves and reloads: a :class:`ScoreSpec` whose fitted copy is stored under ``label``
    (:meth:`ScoreSpec.find` finds it there after ``from_pretrained`` too)."""
    best = unleashed.fitted_scores_[label]
    if not keep_all:  # KNN banks add up over many candidates
        unleashed.fitted_scores_ = {label: best}
    # An unregistered score has no spec: it stays the fitted instance (in memory only).
    unleashed.default_score = variant if isinstance(variant, ScoreSpec) else best


class Reader:
    """Reads a model out with every score variant: one pass over the training data fits them,
    one pass per validation set scores them (:meth:`OODUnleash.evaluate`)."""

    def __init__(
        self,
        train_loader,
        val_loader,
        oods,
        variants,
        *,
        max_fit_batches,
        keep_all,
        progress,
        fusion=0,
    ):
        self.train_loader, self.val_loader, self.oods = train_loader, val_loader, oods
        self.variants: dict[str, Any] = dict(variants)
        self.max_fit_batches, self.keep_all, self.progress = max_fit_batches, keep_all, progress
        self.fusion = fusion  # combine the best this many score families (0: none)
        self.skipped: dict[str, str] = {}
        self.fit_s = self.read_s = 0.0

    def _fresh(self, labels: Iterable[str]) -> dict[str, Any]:
        # Score instances are fitted in place: every candidate gets its own copies.
        return {
            label: copy.deepcopy(spec) if isinstance(spec, OODScore) else spec
            for label, spec in self.variants.items()
            if label in set(labels)
        }

    def _fit(self, unleashed: OODUnleash) -> None:
        common = {"max_batches": self.max_fit_batches, "progress": self.progress}

        def fit(labels: list[str]) -> None:
            unleashed.fit_scores(self.train_loader, self._fresh(labels), **common)

        for label, err in split_failures(list(self.variants), fit)[1].items():
            self._skip(label, err)

    def _evaluate(self, unleashed: OODUnleash) -> EvaluationResults:
        """The validation results of every score that could read the model (raw values kept)."""

        def run(labels: list[str]) -> EvaluationResults:
            scores = {label: label for label in labels}
            return unleashed.evaluate(self.val_loader, self.oods, scores, progress=self.progress)

        parts, failures = split_failures(list(self.variants), run)
        for label, err in failures.items():
            self._skip(label, err)
        if not parts:
            raise RuntimeError(f"No OOD score could read this model: {self.skipped}")
        return EvaluationResults(
            {label: m for part in parts for label, m in part.metrics.items()},
            {label: v for part in parts for label, v in part.id_scores.items()},
            {label: v for part in parts for label, v in part.ood_scores.items()},
            parts[0].id_accuracy,
        )

    def _skip(self, label: str, err: BaseException) -> None:
        self.skipped[label] = schedule.failure_reason(err)
        self.variants.pop(label, None)

    def read(
        self, spec: CandidateSpec, unleashed: OODUnleash, xi: float | None, train_s: float
    ) -> CandidateResult:
        """Fit and score every variant on ``unleashed``, add the fused variants, make the best
        one its default score; the candidate's row of the validation table."""
        started = time.perf_counter()
        self._fit(unleashed)
        fitted = time.perf_counter()
        raw = self._evaluate(unleashed)
        singles = {s: raw.metrics[s] for s in self.variants}
        fused, fitted_fused = read_fusions(
            unleashed.fitted_scores_, raw, self.variants, self.fusion
        )
        unleashed.fitted_scores_.update(fitted_fused)
        done = time.perf_counter()
        self.fit_s, self.read_s = fitted - started, done - started
        metrics = metrics_in_percent(singles | fused)
        accuracy = 100 * float(raw.id_accuracy)
        row = CandidateResult(
            spec.name, spec.kind, spec.tier, accuracy, metrics, xi, train_s + done - started
        )
        variants = {
            **self.variants,
            **{label: ScoreSpec.of(f) for label, f in fitted_fused.items()},
        }
        choose_score(unleashed, row.best_score, variants[row.best_score], self.keep_all)
        return row
