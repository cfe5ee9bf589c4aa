"""The benchmark's plots: OOD metrics per training epoch, final vs control vs UM vs UMAP, and
each fine-tune's accuracy / FPR95 trade-off. They need matplotlib (``pip install
oodunleash[plots]``); without it they are skipped."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from oodunleash.bench.comparisons import rows_of, tradeoff
from oodunleash.bench.grid import from_name
from oodunleash.evaluation.results import save_figure

__all__ = ["plot_setting"]


def plot_setting(
    out: pathlib.Path, setting: str, rs: list[dict[str, Any]], chosen: dict[str, str]
) -> None:
    """Write a setting's plots into ``out``: ``curve_<tag>.png`` (when the per-seed results
    have per-epoch metrics), ``compare_<tag>.png`` and ``tradeoff_<tag>.png``. Nothing
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    tag = setting.replace(":", "_").replace("=", "")
    if all("test" in r["curve"][0] for r in rs):
        _plot_curve(out, setting, tag, rs)
    _plot_compare(out, setting, tag, rs, chosen, plt)
    _plot_tradeoff(out, setting, tag, rs, plt)


def _plot_curve(out: pathlib.Path, setting: str, tag: str, rs: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    oods = list(rs[0]["curve"][0]["test"]["metrics"]["energy"])
    epochs = [c["epoch"] for c in rs[0]["curve"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for row, metric in enumerate(("auroc", "fpr95")):
        for col, score in enumerate(("energy", "msp")):
            ax = axes[row, col]
            for ood in oods:
                vals = np.array(
                    [[c["test"]["metrics"][score][ood][metric] for c in r["curve"]] for r in rs]
                )
                m, s = vals.mean(0), vals.std(0)
                ax.plot(epochs, m, label=ood)
                ax.fill_between(epochs, m - s, m + s, alpha=0.2)
            ax.set_title(f"{score} {metric.upper()} (test)")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("training epoch")
    acc = np.array([[c["test"]["accuracy"] for c in r["curve"]] for r in rs]).mean(0)
    ax2 = axes[0, 0].twinx()
    ax2.plot(epochs, acc, "k--", lw=1, label="ID test acc")
    ax2.set_ylabel("ID acc (%)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{setting}: OOD detection during training (mean ± std over {len(rs)} seeds)")
    fig.tight_layout()
    save_figure(fig, out / f"curve_{tag}.png", dpi=110)
    plt.close(fig)


def _plot_compare(
    out: pathlib.Path,
    setting: str,
    tag: str,
    rs: list[dict[str, Any]],
    chosen: dict[str, str],
    plt: Any,
) -> None:
    oods = list(rs[0]["runs"]["final"]["test"]["metrics"]["energy"])
    rows = rows_of(rs, chosen)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(rows)
    x = np.arange(len(oods))
    for i, (label, name) in enumerate(rows):
        for ax, metric in zip(axes, ("auroc", "fpr95"), strict=True):
            vals = np.array(
                [
                    [r["runs"][name]["test"]["metrics"]["energy"][o][metric] for o in oods]
                    for r in rs
                ]
            )
            mean, std = vals.mean(0), vals.std(0)
            ax.bar(
                x + i * width,
                mean,
                width,
                # ± std, cut at the metric's range (a percentage): a bar near 0 or 100 does
                # not get an error bar past it.
                yerr=np.stack([np.minimum(std, mean), np.minimum(std, 100 - mean)]),
                label=label.split(":")[0],
                capsize=2,
            )
    for ax, metric in zip(axes, ("AUROC", "FPR95"), strict=True):
        ax.set_xticks(x + width * (len(rows) - 1) / 2, oods)
        ax.set_title(f"Energy {metric} (test)")
        ax.grid(axis="y", alpha=0.3)
    # Below the panels: inside them, the legend covered bars (FPR95 reaches 100%).
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(3, len(rows))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"{setting}: final model vs control vs UM vs UMAP")
    fig.tight_layout(rect=(0, 0.04 * math.ceil(len(rows) / ncol), 1, 1))
    save_figure(fig, out / f"compare_{tag}.png", dpi=110)
    plt.close(fig)


def _label_points(
    ax: Any, xy: list[tuple[float, float]], labels: list[str], fontsize: float = 7
) -> None:
    """Label each point just above and right of it, moving a label down by a line while it
    would overlap one already placed: a fine-tune and its control often land on one spot."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for (x, y), label in zip(xy, labels, strict=True):
        offset = 3.0
        while True:
            text = ax.annotate(
                label, (x, y), fontsize=fontsize, xytext=(4, offset), textcoords="offset points"
            )
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or offset < -60 * fontsize:
                break
            text.remove()
            offset -= 1.4 * fontsize
        placed.append(box)


def _plot_tradeoff(
    out: pathlib.Path, setting: str, tag: str, rs: list[dict[str, Any]], plt: Any
) -> None:
    points = tradeoff(rs)
    if not points:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = {"um": "tab:blue", "umap": "tab:orange"}
    labels = []
    for p in points:
        cfg = from_name(p["name"])
        labels.append(f"{cfg.short_name} (n={len(p['seeds'])})")
        (x, dx), (y, dy) = p["accuracy_change"], p["fpr95_change_pct"]
        control = cfg.is_control
        ax.errorbar(
            x,
            y,
            xerr=dx,
            yerr=dy,
            fmt="s" if control else "o",
            mfc="white" if control else colours[cfg.method],
            color=colours[cfg.method],
            capsize=2,
            lw=0.8,
        )
    # The target: within 1 point of accuracy, FPR95 down by a quarter or more.
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    x1, y0 = max(x1, 0.2), min(y0, -30.0)
    ax.fill_between([-1.0, x1], y0, -25.0, color="tab:green", alpha=0.1, lw=0, label="target")
    ax.set_xlim(min(x0, -1.2), x1)
    ax.set_ylim(y0, max(y1, 5.0))
    # Labels go on after the limits are final, so that their overlaps are measured as drawn.
    _label_points(ax, [(p["accuracy_change"][0], p["fpr95_change_pct"][0]) for p in points], labels)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("ID test accuracy change (points), against the final model of the same seed")
    ax.set_ylabel("mean Energy FPR95 change (%), test")
    ax.set_title(
        f"{setting}: fine-tunes, mean ± std over seeds "
        "(filled: flooding; hollow square: its plain-CE control)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / f"tradeoff_{tag}.png", dpi=110)
    plt.close(fig)
