"""The demo's tables and plots: the before/after table of the fine-tunes, the test comparison
of tune's choice, and the figures (:mod:`oodunleash.bench.demo` runs them)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oodunleash.evaluation.results import save_figure

__all__ = ["before_after_table", "comparison_table", "write_plots"]


def _mean(sets: Mapping[str, Mapping[str, float]], metric: str) -> float:
    return float(np.mean([m[metric] for m in sets.values()]))


def before_after_table(results: Mapping[str, Any], scores: Sequence[str]) -> str:
    """Markdown: per model, test ID accuracy and, per score, AUROC / FPR95 averaged over the
    test OOD sets."""
    lines = [
        "| model | ID acc | " + " | ".join(f"{s} AUROC / FPR95" for s in scores) + " |",
        "|---" * (len(scores) + 2) + "|",
    ]
    for label, res in results.items():
        cells = [
            f"{_mean(res['metrics'][s], 'auroc'):.1f} / {_mean(res['metrics'][s], 'fpr95'):.1f}"
            for s in scores
        ]
        lines.append(f"| {label} | {res['accuracy']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per detector, test accuracy, mean AUROC / FPR95 over the test OOD sets and
    FPR95 per set. ``rows``: ``{label: {"accuracy", "metrics": {ood: {auroc, fpr95}}}}``."""
    oods = list(next(iter(rows.values()))["metrics"])
    head = ["detector", "test acc", "mean AUROC", "mean FPR95"] + [f"FPR95 {o}" for o in oods]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, row in rows.items():
        sets = row["metrics"]
        cells = [
            label,
            f"{row['accuracy']:.2f}",
            f"{_mean(sets, 'auroc'):.1f}",
            f"{_mean(sets, 'fpr95'):.1f}",
        ] + [f"{sets[o]['fpr95']:.1f}" for o in oods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(
    out: pathlib.Path,
    curve: list[dict[str, Any]],
    results: Mapping[str, Any],
    tuned: Any,
) -> list[str]:
    """``curve.png`` (Energy AUROC per training epoch), ``compare.png`` (Energy FPR95 per test
    OOD set and model) and ``tune.png`` (:meth:`~oodunleash.tuning.TuneResult.plot`); returns
    the names written, none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install oodunleash[plots]).")
        return []
    epochs = [c["epoch"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    for ood in curve[0]["auroc"]:
        ax.plot(epochs, [c["auroc"][ood] for c in curve], marker="o", label=ood)
    ax.set_xlabel("training epoch")
    ax.set_ylabel("Energy AUROC (%)")
    ax.set_title("OOD detection during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "curve.png", dpi=100)
    plt.close(fig)

    oods = list(next(iter(results.values()))["metrics"]["energy"])
    fig, ax = plt.subplots(figsize=(9.5, 4))
    width = 0.8 / len(results)
    xs = np.arange(len(oods))
    for i, (label, res) in enumerate(results.items()):
        ax.bar(
            xs + i * width, [res["metrics"]["energy"][o]["fpr95"] for o in oods], width, label=label
        )
    ax.set_xticks(xs + width * (len(results) - 1) / 2, oods)
    ax.set_ylabel("Energy FPR95 (%, lower is better)")
    ax.set_title("Before / after, on the test OOD sets")
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: FPR95 bars reach 100%, so no corner inside is reliably empty.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, out / "compare.png", dpi=100)
    plt.close(fig)

    tuned.plot(out / "tune.png")
    return ["curve.png", "compare.png", "tune.png"]
