"""The results of an OOD evaluation: metrics per score and OOD set, the raw per-sample scores,
tables (text and markdown), JSON and plots (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import io
import json
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodunleash.evaluation.metrics import (
    METRICS,
    Positive,
    average_metrics,
    ood_metrics,
    roc_points,
)
from oodunleash.runtime.files import write_atomic

__all__ = ["EvaluationResults", "format_mean_std", "mean_std", "save_figure", "write_atomic"]

#: Keys of :meth:`EvaluationResults.to_dict` that are not score names.
RESERVED_KEYS = ("id_accuracy", "raw_scores")
#: Per-score key holding the mean over OOD sets.
AVERAGE = "average"

_HEADERS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR95"}


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'oodunleash[plots]'.") from err
    return plt


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``, as in papers' "mean ± std over seeds"
    tables; 0 for a single value).

    Example:
        >>> mean_std([30.0, 34.0, 38.0])
        (34.0, 4.0)
    """
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``"mean ± std"`` of ``values`` (:func:`mean_std`), or just the value when there is one.

    Example:
        >>> format_mean_std([30.0, 34.0, 38.0]), format_mean_std([0.5], digits=2)
        ('34.0 ± 4.0', '0.50')
    """
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def save_figure(figure: Any, path: str | pathlib.Path, **savefig_kwargs: Any) -> None:
    """``figure.savefig(path, ...)`` written atomically: an interrupted save leaves the old
    image, never a truncated one. The format follows the file's suffix (PNG by default)."""
    path = pathlib.Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    write_atomic(path, buffer.getvalue())


@dataclass
class EvaluationResults:
    """Metrics of every score on every OOD set, with the raw scores they came from.

    Scores are higher for in-distribution samples. Metrics follow
    :mod:`oodunleash.evaluation.metrics` (ID positive by default); values are fractions in ``[0, 1]``
    (tables show percentages).

    Attributes:
        metrics: ``{score: {ood_name: {"auroc", "aupr_in", "aupr_out", "fpr95"}}}``.
        id_scores: ``{score: array}`` raw scores on the ID test set.
        ood_scores: ``{score: {ood_name: array}}`` raw scores on each OOD set.
        id_accuracy: Top-1 accuracy on the ID test set (``None`` without labels).
        positive: ``"id"`` or ``"ood"``, the FPR95 convention used.
        tpr: The true-positive rate of the FPR metric (0.95).

    Example:
        >>> res = EvaluationResults.from_scores(
        ...     {"msp": np.array([0.9, 0.8, 0.7])}, {"msp": {"noise": np.array([0.1, 0.75])}},
        ...     id_accuracy=0.5)
        >>> round(res.to_dict()["msp"]["noise"]["auroc"], 4)
        0.8333
        >>> print(res.to_markdown())
        | Score | OOD set | AUROC | AUPR-In | AUPR-Out | FPR95 |
        |---|---|---:|---:|---:|---:|
        | msp | noise | 83.33 | 91.67 | 83.33 | 50.00 |
        <BLANKLINE>
        Metrics in %. ID accuracy: 50.00%. ID positive; FPR95 = fraction of OOD accepted at 95% ID kept.
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    id_scores: dict[str, np.ndarray] = field(default_factory=dict)
    ood_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    id_accuracy: float | None = None
    positive: Positive = "id"
    tpr: float = 0.95

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scores(
        cls,
        id_scores: Mapping[str, Any],
        ood_scores: Mapping[str, Mapping[str, Any]],
        *,
        id_accuracy: float | None = None,
        positive: Positive = "id",
        tpr: float = 0.95,
    ) -> EvaluationResults:
        """Compute the metrics of raw scores (arrays or tensors, higher = more ID)."""
        id_arrays = {s: _to_numpy(v) for s, v in id_scores.items()}
        ood_arrays = {
            s: {o: _to_numpy(v) for o, v in sets.items()} for s, sets in ood_scores.items()
        }
        for name in id_arrays:
            if name in RESERVED_KEYS:
                raise ValueError(f"{name!r} is reserved in results; rename that score.")
            if name not in ood_arrays:
                raise ValueError(f"Score {name!r} has ID scores but no OOD scores.")
            if AVERAGE in ood_arrays[name]:
                raise ValueError(f"{AVERAGE!r} is reserved in results; rename that OOD set.")
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        for name, id_arr in id_arrays.items():
            metrics[name] = {}
            for ood_name, ood_arr in ood_arrays[name].items():
                try:
                    metrics[name][ood_name] = ood_metrics(
                        id_arr, ood_arr, positive=positive, tpr=tpr
                    )
                except ValueError as err:
                    raise ValueError(f"Score {name!r} on {ood_name!r}: {err}") from err
        return cls(metrics, id_arrays, ood_arrays, id_accuracy, positive, tpr)

    def recompute(self, *, positive: Positive | None = None, tpr: float | None = None):
        """The same raw scores under another convention (``positive``) or ``tpr``."""
        return EvaluationResults.from_scores(
            self.id_scores,
            self.ood_scores,
            id_accuracy=self.id_accuracy,
            positive=self.positive if positive is None else positive,
            tpr=self.tpr if tpr is None else tpr,
        )

    # ------------------------------------------------------------------ access
    @property
    def score_names(self) -> list[str]:
        """The names of the evaluated scores, in evaluation order.

        Returns:
            The keys of :attr:`metrics`.
        """
        return list(self.metrics)

    @property
    def ood_names(self) -> list[str]:
        """The names of the OOD sets, in order of first appearance across scores.

        Returns:
            Every OOD set any score was evaluated on, each once.
        """
        names: dict[str, None] = {}
        for per_ood in self.metrics.values():
            names.update(dict.fromkeys(per_ood))
        return list(names)

    def averages(self) -> dict[str, dict[str, float]]:
        """``{score: {metric: mean over OOD sets}}``."""
        return {s: average_metrics(per_ood) for s, per_ood in self.metrics.items() if per_ood}

    def best(self, metric: str = "auroc") -> str:
        """The score with the best average ``metric``."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
        sign = 1 if METRICS[metric] else -1
        averages = self.averages()
        return max(averages, key=lambda s: sign * averages[s][metric])

    def __getitem__(self, score: str) -> dict[str, dict[str, float]]:
        return self.metrics[score]

    # ------------------------------------------------------------------ export
    def to_dict(self, include_scores: bool = False) -> dict[str, Any]:
        """``{score: {ood_name: {metric: value}, "average": {...}}, "id_accuracy": float}``.

        With ``include_scores`` a ``"raw_scores"`` entry holds the per-sample scores (lists) and
        the convention, enough for :meth:`from_dict` to rebuild everything.
        """
        out: dict[str, Any] = {}
        averages = self.averages()
        for name, per_ood in self.metrics.items():
            out[name] = {o: dict(m) for o, m in per_ood.items()}
            if name in averages:
                out[name][AVERAGE] = averages[name]
        out["id_accuracy"] = self.id_accuracy
        if include_scores:
            out["raw_scores"] = {
                "positive": self.positive,
                "tpr": self.tpr,
                "id": {s: v.tolist() for s, v in self.id_scores.items()},
                "ood": {
                    s: {o: v.tolist() for o, v in sets.items()}
                    for s, sets in self.ood_scores.items()
                },
            }
        return out

    def to_json(self, path: str | pathlib.Path | None = None, *, include_scores: bool = False):
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(include_scores), indent=2)
        if path is not None:
            write_atomic(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResults:
        """Rebuild from :meth:`to_dict` (raw scores only if they were included)."""
        raw = data.get("raw_scores")
        if raw is not None:
            return cls.from_scores(
                {s: np.asarray(v) for s, v in raw["id"].items()},
                {s: {o: np.asarray(v) for o, v in sets.items()} for s, sets in raw["ood"].items()},
                id_accuracy=data.get("id_accuracy"),
                positive=raw.get("positive", "id"),
                tpr=raw.get("tpr", 0.95),
            )
        metrics = {
            s: {o: dict(m) for o, m in per_ood.items() if o != AVERAGE}
            for s, per_ood in data.items()
            if s not in RESERVED_KEYS
        }
        return cls(metrics, id_accuracy=data.get("id_accuracy"))

    # ------------------------------------------------------------------ tables
    def _rows(self) -> list[list[str]]:
        rows = []
        averages = self.averages()
        for name, per_ood in self.metrics.items():
            entries = list(per_ood.items())
            if len(entries) > 1:
                entries.append((AVERAGE, averages[name]))
            for i, (ood_name, values) in enumerate(entries):
                rows.append(
                    [name if i == 0 else "", ood_name]
                    + [f"{100 * values[k]:.2f}" for k in _HEADERS]
                )
        return rows

    def _footer(self) -> str:
        acc = "n/a" if self.id_accuracy is None else f"{100 * self.id_accuracy:.2f}%"
        pct = f"{100 * self.tpr:g}%"
        if self.positive == "id":
            rule = f"ID positive; FPR95 = fraction of OOD accepted at {pct} ID kept."
        else:
            rule = f"OOD positive; FPR95 = fraction of ID rejected at {pct} OOD detected."
        return f"Metrics in %. ID accuracy: {acc}. {rule}"

    def to_markdown(self) -> str:
        """A markdown table (percentages)."""
        head = ["Score", "OOD set", *_HEADERS.values()]
        lines = [
            "| " + " | ".join(head) + " |",
            "|---|---|" + "---:|" * len(_HEADERS),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines) + "\n\n" + self._footer()

    def table(self) -> str:
        """A plain-text table (percentages)."""
        head = ["Score", "OOD set", *_HEADERS.values()]
        rows = [head, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

        def fmt(row: Sequence[str]) -> str:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, rows[1:]), rule, self._footer()])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"EvaluationResults(scores={self.score_names}, ood={self.ood_names}, "
            f"id_accuracy={self.id_accuracy})"
        )

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    # ------------------------------------------------------------------ plots
    def _pick(self, scores: str | Sequence[str] | None) -> list[str]:
        if not self.id_scores:
            raise ValueError("These results hold no raw scores (rebuilt from metrics only).")
        names = [scores] if isinstance(scores, str) else list(scores or self.id_scores)
        unknown = [n for n in names if n not in self.id_scores]
        if unknown:
            raise ValueError(f"No raw scores for {unknown}; available: {list(self.id_scores)}.")
        return names

    def plot_roc(
        self, scores: str | Sequence[str] | None = None, ood: str | None = None, ax: Any = None
    ):
        """ROC curves (x: OOD accepted, y: ID kept), one panel per OOD set (or only ``ood``
        on ``ax``), one curve per score. Returns the matplotlib figure."""
        plt = _plt()
        names = self._pick(scores)
        oods = [ood] if ood is not None else self.ood_names
        if ax is not None and len(oods) != 1:
            raise ValueError("Pass ood=... to draw a single OOD set on the given ax.")
        if ax is None:
            fig, axes = plt.subplots(1, len(oods), figsize=(4.2 * len(oods), 4), squeeze=False)
            axes = list(axes[0])
        else:
            fig, axes = ax.figure, [ax]
        for panel, ood_name in zip(axes, oods, strict=True):
            for name in names:
                id_arr, ood_arr = self.id_scores[name], self.ood_scores[name][ood_name]
                fpr, tpr = roc_points(id_arr, ood_arr)
                auc = self.metrics[name][ood_name]["auroc"]
                panel.plot(fpr, tpr, label=f"{name} ({100 * auc:.1f})")
            panel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            panel.set(xlabel="OOD accepted (FPR)", ylabel="ID kept (TPR)", title=ood_name)
            panel.legend(fontsize="small", loc="lower right")
        fig.tight_layout()
        return fig

    def plot_histograms(
        self, scores: str | Sequence[str] | None = None, bins: int = 50, axes: Any = None
    ):
        """Histograms of the ID and OOD scores, one panel per score. Returns the figure."""
        plt = _plt()
        names = self._pick(scores)
        if axes is None:
            fig, grid = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
            axes = list(grid[0])
        else:
            axes = list(np.atleast_1d(axes))
            fig = axes[0].figure
        if len(axes) != len(names):
            raise ValueError(f"Got {len(axes)} axes for {len(names)} scores.")
        for panel, name in zip(axes, names, strict=True):
            arrays = {"ID": self.id_scores[name], **self.ood_scores[name]}
            edges = np.histogram_bin_edges(np.concatenate(list(arrays.values())), bins=bins)
            for label, arr in arrays.items():
                panel.hist(arr, bins=edges, density=True, alpha=0.5, label=label)
            panel.set(xlabel=f"{name} score (higher = ID)", ylabel="density", title=name)
            panel.legend(fontsize="small")
        fig.tight_layout()
        return fig


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
