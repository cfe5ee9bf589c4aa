"""Paired comparisons of benchmark runs: each fine-tune against the unchanged model of the same
seeds (mean FPR95, AUROC, accuracy change), and the rows a setting's table and plots show."""

from __future__ import annotations

from typing import Any

import numpy as np

from oodunleash.bench.grid import MASKED_RECIPES, FineTune
from oodunleash.evaluation.results import mean_std

__all__ = ["rows_of", "tradeoff"]


def _mean_fpr(block: dict[str, Any], score: str = "energy") -> float:
    sets = block["metrics"][score]
    return float(np.mean([m["fpr95"] for m in sets.values()]))


def _mean_auroc(block: dict[str, Any], score: str = "energy") -> float:
    sets = block["metrics"][score]
    return float(np.mean([m["auroc"] for m in sets.values()]))


def _common_runs(rs: list[dict[str, Any]]) -> list[str]:
    """Runs every seed finished (a deadline may have cut some seeds short)."""
    return [n for n in rs[0]["runs"] if all(n in r["runs"] for r in rs)]


def _paired(
    rs: list[dict[str, Any]], name: str, split: str
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """The seeds that finished run ``name``, its ``split`` results and their final model's."""
    have = [r for r in rs if name in r["runs"]]
    return (
        [r["seed"] for r in have],
        [r["runs"][name][split] for r in have],
        [r["runs"]["final"][split] for r in have],
    )


def _accuracy_change(
    runs: list[dict[str, Any]], finals: list[dict[str, Any]]
) -> tuple[float, float]:
    """Mean ± std over seeds of each run's accuracy minus its own seed's final model's."""
    return mean_std([a["accuracy"] - f["accuracy"] for a, f in zip(runs, finals, strict=True)])


def tradeoff(rs: list[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """Each fine-tune's ID accuracy change (points) and relative change of the mean Energy
    FPR95 (%), against the final model of the same seed, as ``(mean, std)`` over the seeds
    that finished it. The issue's target is accuracy change ≥ −1 and FPR95 change ≤ −25%."""
    names = dict.fromkeys(n for r in rs for n in r["runs"] if n != "final")
    points = []
    for name in names:
        seeds, runs, finals = _paired(rs, name, split)
        fpr_changes = [
            100 * (_mean_fpr(a) / _mean_fpr(f) - 1) for a, f in zip(runs, finals, strict=True)
        ]
        points.append(
            {
                "name": name,
                "seeds": seeds,
                "accuracy_change": _accuracy_change(runs, finals),
                "fpr95_change_pct": mean_std(fpr_changes),
            }
        )
    return points


def rows_of(rs: list[dict[str, Any]], chosen: dict[str, str]) -> list[tuple[str, str]]:
    """The ``(label, run name)`` rows of a setting's tables and plots: the unchanged model, then
    each chosen fine-tune and its control."""
    rows = [("final model", "final")]
    labels = {
        "um_control": "control (plain CE, UM recipe)",
        "um": "UM",
        "umap_control": "control (plain CE, UMAP recipe)",
        "umap": "UMAP",
    }
    rows += [(f"{labels[k]}: {chosen[k]}", chosen[k]) for k in labels if k in chosen]
    paper = FineTune("um", MASKED_RECIPES["ref"]).name
    if paper in _common_runs(rs) and paper not in chosen.values():
        rows.append((f"UM, the paper's ξ recipe ({paper})", paper))
    return rows
