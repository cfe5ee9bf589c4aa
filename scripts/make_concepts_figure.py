"""Draw the figure of the Concepts page: ``docs/assets/concepts.svg``.

    .venv/bin/python scripts/make_concepts_figure.py

Three panels (two above, one below): (1) the intermediate stage, as a *schematic* (smooth illustrative curves, no
measured data, no numbers on the axes); (2) the flooding objective ``|CE - ξ| + ξ``, drawn
exactly; (3) what UM and UMAP change in a layer's weight matrix (illustrative random weights).
The output is deterministic (fixed seed, no date, fixed SVG ids), so re-running it on an
unchanged script leaves the committed file unchanged.
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "assets" / "concepts.svg"

LOSS = "#3f51b5"  # indigo, the site's primary colour
OOD = "#e65100"  # deep orange, the accent
GREY = "#757575"


def intermediate_stage(ax: plt.Axes) -> None:
    t = np.linspace(0, 1, 400)
    loss = 0.04 + 0.96 * np.exp(-6 * t)  # training loss falls towards zero
    # OOD detection quality: rises while the model learns the typical samples, then erodes as
    # it memorises the atypical ones.
    ood = 0.25 + 0.75 * (1 - np.exp(-9 * t)) - 0.55 * np.clip(t - 0.35, 0, None) ** 1.4
    stage = 0.35
    xi = 0.04 + 0.96 * np.exp(-6 * stage)
    ax.plot(t, loss, color=LOSS, lw=2, label="ID training loss")
    ax.plot(t, ood, color=OOD, lw=2, label="OOD detection quality")
    ax.axvline(stage, color=GREY, ls="--", lw=1)
    ax.axhline(xi, color=LOSS, ls=":", lw=1.2)
    ax.annotate("intermediate\nstage", xy=(stage + 0.02, 0.55), fontsize=9, color=GREY)
    ax.annotate("ξ: the loss level\nof that stage", xy=(0.62, xi + 0.03), fontsize=9, color=LOSS)
    ax.annotate(
        "trained to the end:\nloss ≈ 0, OOD worse",
        xy=(0.98, 0.45),
        ha="right",
        fontsize=9,
        color=GREY,
    )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.3),
        xlabel="training epochs →",
        title="1. The intermediate stage (schematic)",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8, frameon=False)


def flooding(ax: plt.Axes) -> None:
    xi = 0.4
    ce = np.linspace(0, 1.2, 300)
    ax.plot(ce, np.abs(ce - xi) + xi, color=LOSS, lw=2, label="|CE − ξ| + ξ")
    ax.plot(ce, ce, color=GREY, lw=1, ls="--", label="CE (plain fine-tune)")
    ax.axvline(xi, color=GREY, ls=":", lw=1)
    ax.annotate("ξ", xy=(xi, 0.02), xytext=(xi + 0.02, 0.02), fontsize=10)
    arrows = [
        ("below ξ:\ngradient ascent", (0.2, 0.62), (0.04, 0.95)),
        ("above ξ:\ngradient descent", (0.95, 0.95), (0.62, 1.25)),
    ]
    for text, point, label_at in arrows:
        arrow = {"arrowstyle": "->", "color": GREY}
        ax.annotate(text, xy=point, xytext=label_at, fontsize=9, arrowprops=arrow)
    ax.set(
        xlim=(0, 1.2),
        ylim=(0, 1.45),
        xlabel="batch cross-entropy (CE)",
        ylabel="objective",
        title="2. The forgetting objective",
    )
    ax.set_xticks([0, xi])
    ax.set_xticklabels(["0", "ξ"])
    ax.set_yticks([])
    ax.legend(loc="lower right", fontsize=8, frameon=False)


def um_vs_umap(ax: plt.Axes, rng: np.random.Generator) -> None:
    n = 6
    weights = rng.normal(size=(n, n))
    um = weights + 0.35 * rng.normal(size=(n, n))
    mask = np.ones(n * n)
    mask[rng.permutation(n * n)[: round(0.1 * n * n)]] = 0  # keep 90%, the default
    umap = np.where(mask.reshape(n, n) == 1, weights, np.nan)
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("white")
    limit = np.abs(weights).max()
    for offset, values, label in (
        (0, weights, "trained\nweights"),
        (n + 2, um, "UM: every\nweight moves"),
        (2 * n + 4, umap, "UMAP: weights frozen,\n10% masked out"),
    ):
        ax.imshow(
            values,
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            extent=(offset, offset + n, 0, n),
            interpolation="nearest",
        )
        ax.add_patch(plt.Rectangle((offset, 0), n, n, fill=False, lw=1, color=GREY))
        ax.text(offset + n / 2, -0.6, label, ha="center", va="top", fontsize=9)
    # Cross out the masked cells of UMAP.
    for i, j in zip(*np.where(np.isnan(umap)), strict=True):
        x0, y0 = 2 * n + 4 + j, n - 1 - i
        ax.plot([x0 + 0.2, x0 + 0.8], [y0 + 0.2, y0 + 0.8], color=GREY, lw=0.8)
        ax.plot([x0 + 0.2, x0 + 0.8], [y0 + 0.8, y0 + 0.2], color=GREY, lw=0.8)
    ax.set(xlim=(-0.5, 3 * n + 4.5), ylim=(-3.2, n + 0.5), title="3. UM vs UMAP in one layer")
    ax.set_aspect("equal")
    ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    plt.rcParams.update({"svg.hashsalt": "oodunleash-concepts", "font.size": 9})
    rng = np.random.default_rng(0)
    fig = plt.figure(figsize=(10, 7.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.8])
    intermediate_stage(fig.add_subplot(grid[0, 0]))
    flooding(fig.add_subplot(grid[0, 1]))
    um_vs_umap(fig.add_subplot(grid[1, :]), rng)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="svg", metadata={"Date": None}, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
