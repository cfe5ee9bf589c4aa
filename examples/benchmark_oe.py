"""Outlier exposure (OE) on the Fashion-MNIST benchmark, with and without Unleashing Mask.

Starts from the SmallCNN seed-0 final checkpoint of the benchmark (``oodunleash benchmark
--checkpoints final`` writes ``<out>/checkpoints/small_cnn_s0/epoch025.safetensors``) and
fine-tunes it with the recipe of the benchmark's UM rows (10 epochs, SGD lr 0.01, cosine,
batch 128, on the ID training split) four ways:

* ``control``: plain cross-entropy (``flooding=False``);
* ``um``: Unleashing Mask with ξ = 4x the model's training loss (the library default when
  these numbers were measured; it is 3x now);
* ``oe``: plain cross-entropy + OE (``flooding=False``, ``outlier_loader=glyphs``);
* ``um+oe``: UM (default ξ) + OE.

The auxiliary outliers are :class:`oodunleash.bench.datasets.GlyphsOOD` (rendered letters and
symbols), disjoint from every test OOD set. Everything is evaluated, like the final model, with
the benchmark's :func:`oodunleash.bench.protocol.evaluate_model` on the *test* ID/OOD sets (near =
test images of classes 6-9, digits, photos, gaussian, uniform). One seed only, and by default
the ID training split is subsampled to 12,000 images (``--train-size``) so four fine-tunes fit
a CPU budget.

Run::

    python examples/benchmark_oe.py --out runs/oe
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time

import numpy as np
import torch

from oodunleash import OODUnleash, Relative
from oodunleash.bench.datasets import GlyphsOOD
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import TensorLoader, evaluate_model, load_benchmark_data
from oodunleash.bench.run import load_checkpoint
from oodunleash.evaluation.results import write_atomic

RUNS = {
    "control": dict(flooding=False),
    "um": dict(),
    "oe": dict(flooding=False, outlier=True),
    "um+oe": dict(outlier=True),
}


def table(results: dict[str, dict], sets: list[str], score: str = "energy") -> str:
    """Markdown table: ID accuracy, per-set AUROC / FPR95, mean AUROC, mean FPR95."""
    head = ["run", "ID acc"] + [f"{s} AUROC / FPR95" for s in sets] + ["mean AUROC", "mean FPR95"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        m = res["metrics"][score]
        cells = [name, f"{res['accuracy']:.2f}"]
        cells += [f"{m[s]['auroc']:.1f} / {m[s]['fpr95']:.1f}" for s in sets]
        cells.append(f"{np.mean([m[s]['auroc'] for s in sets]):.1f}")
        cells.append(f"{np.mean([m[s]['fpr95'] for s in sets]):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        default="runs/gpu1/checkpoints/small_cnn_s0/epoch025.safetensors",
        help="final SmallCNN checkpoint (oodunleash benchmark --checkpoints final writes it)",
    )
    parser.add_argument("--out", default="runs/oe", help="where results.json / results.md go")
    parser.add_argument("--train-size", type=int, default=12000, help="ID training subsample")
    parser.add_argument("--glyphs", type=int, default=2000, help="number of auxiliary outliers")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = load_benchmark_data("fashion-mnist", train_size=args.train_size)
    train_x, train_y = data["train"]
    glyphs = GlyphsOOD(n=args.glyphs, seed=args.seed).tensors()[0]
    print(f"train {len(train_y)} ID images, {len(glyphs)} glyph outliers", flush=True)
    model = create_model("small_cnn", data["num_classes"])
    load_checkpoint(model, args.checkpoint)
    final_state = copy.deepcopy(model.state_dict())

    def evaluate(m: torch.nn.Module) -> dict:
        return evaluate_model(m, data["test"], data["test_ood"], ("energy", "msp"))

    results = {"final": evaluate(model)}
    info: dict[str, dict] = {}
    for name, cfg in RUNS.items():
        model.load_state_dict(final_state)
        torch.manual_seed(args.seed)
        unleashed = OODUnleash(model, method="um", constraint=Relative(4.0), seed=args.seed)
        outlier = None
        if cfg.get("outlier"):
            outlier = TensorLoader(
                glyphs, torch.full((len(glyphs),), -1), 128, shuffle=True, seed=args.seed + 2
            )
        t0 = time.perf_counter()
        unleashed.fit(
            TensorLoader(train_x, train_y, 128, shuffle=True, seed=args.seed + 1),
            epochs=args.epochs,
            lr=args.lr,
            flooding=cfg.get("flooding", True),
            outlier_loader=outlier,
            progress=False,
        )
        fit_s = time.perf_counter() - t0
        results[name] = evaluate(unleashed.export())
        info[name] = {"fit_s": fit_s, "xi": unleashed.loss_constraint_}
        print(
            f"{name}: fit {fit_s:.0f}s, xi={unleashed.loss_constraint_}, "
            f"acc {results[name]['accuracy']:.2f}",
            flush=True,
        )

    sets = list(data["test_ood"])
    wall = time.perf_counter() - started
    md = "\n\n".join(
        [
            f"Energy (test sets; AUROC / FPR95 in %), {len(train_y)} ID training images, "
            f"{len(glyphs)} glyph outliers, seed {args.seed}:",
            table(results, sets, "energy"),
            "MSP:",
            table(results, sets, "msp"),
            f"Wall time: {wall:.0f} s.",
        ]
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(
        out / "results.json",
        json.dumps({"results": results, "runs": info, "wall_s": wall, "args": vars(args)}),
    )
    write_atomic(out / "results.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
