"""The outcome of :func:`~oodunleash.tune`: every candidate's validation metrics, the selection
rule, and the chosen detector."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oodunleash.evaluation.results import save_figure
from oodunleash.wrapper import OODUnleash

__all__ = [
    "CandidateResult",
    "TuneResult",
    "mean_ranks",
    "ranked",
    "ranked_candidates",
    "recipe_name",
    "select",
]

#: Key of the mean over validation OOD sets in :attr:`CandidateResult.metrics`.
MEAN = "mean"


def ranked(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """The scores of ``metrics`` (in %, per OOD set and the :data:`MEAN` entry) best first.

    The rule: on each OOD set the scores given are ranked by AUROC (ties share their mean
    rank), and the lowest mean rank over the sets wins; then the lowest mean FPR95, the highest
    mean AUROC, the order given. Ranks count every OOD set once whatever its scale, so one hard
    set cannot decide alone (in a mean of FPR95, a set where every score does badly outweighs
    the easy ones together); AUROC, unlike FPR95, rarely ties at 0 on easy sets.
    ``examples/benchmark_choice_rule.py`` compares the rules on validation data.

    Example:
        >>> ranked({"a": {"x": {"auroc": 99.0, "fpr95": 1.0}, "y": {"auroc": 60.0, "fpr95": 90.0},
        ...               "z": {"auroc": 99.5, "fpr95": 0.5}, "mean": {"auroc": 86.2, "fpr95": 30.5}},
        ...         "b": {"x": {"auroc": 90.0, "fpr95": 30.0}, "y": {"auroc": 80.0, "fpr95": 50.0},
        ...               "z": {"auroc": 95.0, "fpr95": 20.0}, "mean": {"auroc": 88.3, "fpr95": 33.3}}})
        ['a', 'b']
    """
    ranks = mean_ranks(metrics)
    return sorted(
        ranks,
        key=lambda s: (
            round(ranks[s], 9),
            round(metrics[s][MEAN]["fpr95"], 6),
            -round(metrics[s][MEAN]["auroc"], 6),
        ),
    )


def mean_ranks(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``{score: its mean rank over the OOD sets}``, 1 the best: on each set the scores given
    are ranked by AUROC, ties sharing their mean rank (only the :data:`MEAN` entry: by it).

    Example:
        >>> mean_ranks({"a": {"x": {"auroc": 99.0}, "y": {"auroc": 80.0}},
        ...             "b": {"x": {"auroc": 99.0}, "y": {"auroc": 90.0}}})
        {'a': 1.75, 'b': 1.25}
    """
    names = list(metrics)
    if not names:
        return {}
    sets = [key for key in metrics[names[0]] if key != MEAN] or [MEAN]
    ranks = dict.fromkeys(names, 0.0)
    for ood in sets:
        # Rounded so that equal AUROCs computed in a different order still tie.
        values = {name: round(metrics[name][ood]["auroc"], 6) for name in names}
        for name, value in values.items():
            above = sum(other > value for other in values.values())
            ties = sum(other == value for other in values.values())
            ranks[name] += (1 + above + (ties - 1) / 2) / len(sets)
    return ranks


def ranked_candidates(candidates: Sequence[CandidateResult]) -> list[CandidateResult]:
    """``candidates`` best first, each by its :attr:`~CandidateResult.best_score`, under
    :func:`ranked`'s rule (ties to the one listed first)."""
    by_name = {c.name: c for c in candidates}
    return [by_name[name] for name in ranked({c.name: c.metrics[c.best_score] for c in candidates})]


def recipe_name(candidate: str, score: str) -> str:
    """``"<candidate> + <score>"``, a fused score's members in parentheses.

    Example:
        >>> recipe_name("umap", "knn k=1"), recipe_name("unchanged", "knn k=1 + energy")
        ('umap + knn k=1', 'unchanged + (knn k=1 + energy)')
    """
    return f"{candidate} + ({score})" if " + " in score else f"{candidate} + {score}"


@dataclass
class CandidateResult:
    """One candidate model, read out by every score variant on the validation data.

    Attributes:
        name: The candidate (``"unchanged"``, ``"umap"``, ``"checkpoint epoch 5"``, ...).
        kind: ``"unchanged"``, ``"checkpoint"`` or ``"finetune"``.
        tier: Cost tier (0 unchanged, 1 checkpoint, 2 fine-tune): ties go to the lower tier.
        accuracy: Validation ID accuracy, in %.
        metrics: ``{score: {ood_set: {"auroc", "fpr95"}, "mean": {"auroc", "fpr95"}}}``, in %.
        loss_constraint: The ξ of a flooding fine-tune (``None`` otherwise).
        time_s: Seconds spent on this candidate (fine-tune and read-out).
    """

    name: str
    kind: str
    tier: int
    accuracy: float
    metrics: dict[str, dict[str, dict[str, float]]]
    loss_constraint: float | None = None
    time_s: float = 0.0

    @property
    def best_score(self) -> str:
        """The best of this candidate's scores on validation, under :func:`ranked`'s rule."""
        return ranked(self.metrics)[0]

    @property
    def mean_fpr95(self) -> float:
        """Mean validation FPR95 of :attr:`best_score`, in %."""
        return self.metrics[self.best_score][MEAN]["fpr95"]

    @property
    def mean_auroc(self) -> float:
        """Mean validation AUROC of :attr:`best_score`, in %."""
        return self.metrics[self.best_score][MEAN]["auroc"]


def select(
    candidates: Sequence[CandidateResult], max_accuracy_drop: float
) -> tuple[CandidateResult, float]:
    """The selection rule of :func:`~oodunleash.tune`.

    Among candidates whose validation accuracy is at most ``max_accuracy_drop`` points below
    the unchanged model's, the one whose best score ranks first under :func:`ranked`'s rule
    (mean per-set rank of AUROC among those best scores); a tie goes to the cheaper candidate
    (unchanged, then checkpoints, then fine-tunes), then to the one listed first. The
    unchanged model is always eligible, so the choice never ranks below it on validation.

    Returns:
        The chosen candidate and the accuracy threshold it had to meet.

    Example:
        >>> def row(name, tier, acc, fpr):
        ...     metrics = {"energy": {"mean": {"fpr95": fpr, "auroc": 90.0}}}
        ...     kind = "unchanged" if tier == 0 else "finetune"
        ...     return CandidateResult(name, kind, tier, acc, metrics)
        >>> rows = [row("unchanged", 0, 95.0, 40.0), row("um", 2, 93.0, 10.0),
        ...         row("umap", 2, 94.5, 20.0)]
        >>> chosen, floor = select(rows, max_accuracy_drop=1.0)
        >>> chosen.name, floor  # "um" is better but costs 2 points
        ('umap', 94.0)
    """
    reference = next((c for c in candidates if c.kind == "unchanged"), None)
    if reference is None:
        raise ValueError("The unchanged model must be among the candidates.")
    floor = reference.accuracy - max_accuracy_drop
    eligible = [c for c in candidates if c.accuracy >= floor - 1e-9]
    order = {id(c): i for i, c in enumerate(candidates)}
    eligible.sort(key=lambda c: (c.tier, order[id(c)]))  # ties go to the cheaper, then first
    return ranked_candidates(eligible)[0], floor


@dataclass
class TuneResult:
    """What :func:`~oodunleash.tune` found. Printing it shows the validation table.

    Attributes:
        best: An :class:`~oodunleash.OODUnleash` around the chosen model, its scores fitted:
            ``best.score(x)`` uses the chosen score. When the unchanged model or a checkpoint
            wins, it wraps that model without a fine-tune (``best.is_fitted`` is then
            ``False``, and ``best.model`` is the model to use; for the unchanged model it *is*
            the model passed in).
        best_name: ``"<candidate> + <score>"``, e.g. ``"umap + knn k=50"``, a fused score's
            members in parentheses: ``"unchanged + (knn k=1 + energy)"``.
        best_candidate: The chosen candidate's name.
        best_score: The chosen score's label.
        candidates: ``{name: CandidateResult}`` of every candidate that ran.
        reference_accuracy: The unchanged model's validation accuracy (%).
        max_accuracy_drop: The allowed drop, in points.
        ood_sets: Names of the validation OOD sets the metrics average over.
        proxy: Whether those include proxy sets built by :func:`~oodunleash.proxy_ood`.
        dropped: ``{candidate: reason}`` for candidates that did not run (time budget, ξ too
            high, a failed fine-tune).
        skipped_scores: ``{score: reason}`` for score variants that could not read this model.
        time_s: Wall time of the whole call.
        unleashed: With ``tune(..., keep_all=True)``: ``{candidate: OODUnleash}`` with every
            score variant fitted; empty otherwise.
    """

    best: OODUnleash
    best_name: str
    best_candidate: str
    best_score: str
    candidates: dict[str, CandidateResult]
    reference_accuracy: float
    max_accuracy_drop: float
    ood_sets: list[str]
    proxy: bool
    dropped: dict[str, str] = field(default_factory=dict)
    skipped_scores: dict[str, str] = field(default_factory=dict)
    time_s: float = 0.0
    unleashed: dict[str, OODUnleash] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ access
    def eligible(self, name: str) -> bool:
        """Whether candidate ``name`` met the accuracy requirement."""
        floor = self.reference_accuracy - self.max_accuracy_drop
        return self.candidates[name].accuracy >= floor - 1e-9

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        chosen = self.candidates[self.best_candidate]
        source = "proxy" if self.proxy else "given"
        others = f", {len(self.dropped)} not run" if self.dropped else ""
        return (
            f"TuneResult(best={self.best_name!r},\n"
            f"  val accuracy {chosen.accuracy:.2f}% "
            f"({chosen.accuracy - self.reference_accuracy:+.2f} vs unchanged), mean FPR95 "
            f"{chosen.mean_fpr95:.1f}%, mean AUROC {chosen.mean_auroc:.1f}% on "
            f"{len(self.ood_sets)} {source} OOD sets,\n"
            f"  {len(self.candidates)} candidates read out{others}, {self.time_s:.0f} s; "
            "the table: .to_markdown())"
        )

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as JSON-able builtins (metrics in %)."""
        return {
            "best_name": self.best_name,
            "best_candidate": self.best_candidate,
            "best_score": self.best_score,
            "reference_accuracy": self.reference_accuracy,
            "max_accuracy_drop": self.max_accuracy_drop,
            "ood_sets": list(self.ood_sets),
            "proxy": self.proxy,
            "candidates": {
                name: {
                    "kind": c.kind,
                    "accuracy": c.accuracy,
                    "eligible": self.eligible(name),
                    "best_score": c.best_score,
                    "mean_fpr95": c.mean_fpr95,
                    "mean_auroc": c.mean_auroc,
                    "loss_constraint": c.loss_constraint,
                    "time_s": c.time_s,
                    "scores": c.metrics,
                }
                for name, c in self.candidates.items()
            },
            "dropped": dict(self.dropped),
            "skipped_scores": dict(self.skipped_scores),
            "time_s": self.time_s,
        }

    def to_json(self, path: str | pathlib.Path | None = None) -> str:
        """:meth:`to_dict` as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            pathlib.Path(path).write_text(text + "\n", encoding="utf8")
        return text

    def to_markdown(self, all_scores: bool = False) -> str:
        """The validation table: one row per candidate with its best score (``all_scores``:
        one row per candidate and score), the chosen one in bold; metrics in %. "rank" is what
        the rule compared: the mean per-set rank of AUROC among the eligible candidates' best
        scores (``all_scores``: among the candidate's own scores)."""
        oods = list(self.ood_sets)
        head = ["candidate", "score", "val acc", "Δ acc", "rank", "AUROC", "FPR95"]
        head += [f"FPR95 {o}" for o in oods]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
        best = {n: c.metrics[c.best_score] for n, c in self.candidates.items() if self.eligible(n)}
        among_candidates = mean_ranks(best)
        for name, c in self.candidates.items():
            labels = list(c.metrics) if all_scores else [c.best_score]
            if all_scores:
                ranks = mean_ranks(c.metrics)
            else:  # below the accuracy floor: not compared, no rank
                ranks = {c.best_score: among_candidates[name]} if name in best else {}
            for label in labels:
                m = c.metrics[label]
                cells = [
                    name + ("" if self.eligible(name) else " (accuracy)"),
                    label,
                    f"{c.accuracy:.2f}",
                    f"{c.accuracy - self.reference_accuracy:+.2f}",
                    f"{ranks[label]:.2f}" if label in ranks else "–",
                    f"{m[MEAN]['auroc']:.1f}",
                    f"{m[MEAN]['fpr95']:.1f}",
                ] + [f"{m[o]['fpr95']:.1f}" for o in oods]
                if name == self.best_candidate and label == self.best_score:
                    cells = [f"**{cell}**" for cell in cells]
                lines.append("| " + " | ".join(cells) + " |")
        source = "proxy OOD built from the validation images" if self.proxy else "given OOD sets"
        notes = [
            "",
            f"Validation metrics in %, mean over {len(oods)} OOD sets ({source}). "
            f"Chosen: **{self.best_name}**, the best mean rank of AUROC over the OOD sets "
            "among candidates within "
            f"{self.max_accuracy_drop:g} points of the unchanged model's accuracy "
            f"({self.reference_accuracy:.2f}%); '(accuracy)' marks those below it.",
        ]
        for name, reason in self.dropped.items():
            notes.append(f"Not run: {name} ({reason}).")
        for label, reason in self.skipped_scores.items():
            notes.append(f"Score left out: {label} ({reason}).")
        return "\n".join(lines + notes)

    def plot(self, path: str | pathlib.Path | None = None, *, ax: Any = None) -> Any:
        """Validation accuracy against mean FPR95, one point per candidate (its best score),
        the chosen one starred and the accuracy floor dashed. Needs matplotlib.

        Args:
            path: Save the figure there (format from the suffix); ``None``: only return it.
            ax: Draw into this matplotlib axes instead of a new figure.

        Returns:
            The matplotlib figure.
        """
        if ax is None:
            try:
                from matplotlib.figure import Figure
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "Plotting needs matplotlib: pip install 'oodunleash[plots]'."
                ) from err
            # A bare Figure, not pyplot: no GUI backend is touched, nothing stays open.
            fig = Figure(figsize=(6.4, 4.4))
            ax = fig.subplots()
        else:
            fig = ax.figure
        placed: dict[tuple[float, float], int] = {}  # points drawn at (about) one spot
        for name, c in self.candidates.items():
            chosen = name == self.best_candidate
            spot = (round(c.mean_fpr95, 1), round(c.accuracy, 1))
            stacked = placed[spot] = placed.get(spot, -1) + 1
            ax.scatter(
                c.mean_fpr95,
                c.accuracy,
                marker="*" if chosen else "o",
                s=220 if chosen else 40,
                color="tab:red" if chosen else ("tab:blue" if self.eligible(name) else "0.6"),
                zorder=3,
            )
            ax.annotate(
                f"{name} + {c.best_score}",
                (c.mean_fpr95, c.accuracy),
                textcoords="offset points",
                xytext=(5, 4 - 10 * stacked),  # one line lower per label already there
                fontsize=8,
            )
        floor = self.reference_accuracy - self.max_accuracy_drop
        ax.axhline(floor, linestyle="--", color="0.5", linewidth=1, label="accuracy floor")
        ax.set_xlabel("mean validation FPR95 (%)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"tune: chose {self.best_name}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        if path is not None:
            save_figure(fig, path, dpi=120)
        return fig


def metrics_in_percent(
    per_score: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """``{score: {ood: {auroc, fpr95}}}`` fractions to percent, with the mean over OOD sets."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for score, per_ood in per_score.items():
        rows = {o: {k: 100 * float(m[k]) for k in ("auroc", "fpr95")} for o, m in per_ood.items()}
        rows[MEAN] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("auroc", "fpr95")}
        out[score] = rows
    return out
