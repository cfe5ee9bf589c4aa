"""Post-hoc ReAct and DICE on a benchmark's final models, with and without UM.

ReAct (clip the penultimate activations) and DICE (drop the head weights with the smallest
contributions) try to make the Energy score a better OOD detector without any training; UM
tries the same by fine-tuning. This script measures both on the models of an earlier
``oodunleash benchmark --checkpoints final`` run (its per-seed JSON and final checkpoint,
``checkpoints/<setting>_s<seed>/epoch<epochs>.safetensors``; ``--setting`` picks the model,
``small_cnn`` by default, and the run's training-set size is read from its JSON):

* the final model with Energy, ReAct (90th percentile) and DICE at 50%, 70% and 90% sparsity,
  on the validation and the test split (choose the sparsity on validation);
* with ``--um``, the same scores after UM with ξ = 3x the stored training loss, fine-tuned
  exactly as the benchmark's ``um/train_x3/lr0.01/ep10`` row (same seeds, same loader), so its
  Energy numbers can be checked against that row;
* with ``--control``, the same after that fine-tune without the constraint (plain
  cross-entropy, the benchmark's ``um/control/lr0.01/ep10`` row): whether a post-hoc score's
  gain after UM is UM's doing or any fine-tune's;
* with ``--finetune NAME``, the same after any fine-tune of the benchmark's grid, e.g.
  ``umap/train_x3/lr0.1/ep10/keep0.9/model/norms`` (``--um`` and ``--control`` are
  ``um/train_x3/lr0.01/ep10`` and ``um/control/lr0.01/ep10``).

Scores that learn from ID data are fitted on the benchmark's 10,000 training images of the
seed (the same subsample the benchmark fits its scores on). Results go to
``<run>/posthoc_s<seed>.json`` (``um_posthoc_s<seed>.json`` with ``--um``,
``control_posthoc_s<seed>.json`` with ``--control``, the fine-tune's name with ``_`` for
``/`` before ``_posthoc`` with ``--finetune``).

    OODUNLEASH_FASHION_MNIST=/usr/share/datasets/fashion-mnist \\
    python examples/posthoc_scores.py --run runs/cpu3 --seeds 0 1 2 [--um | --control]
    python examples/posthoc_scores.py --run runs/cpu3 --finetune umap/train_x3/lr0.1/ep10/keep0.9/model

``--summarize`` reads those files from one or more runs instead, over the seeds that every
variant has (or ``--seeds``), prints a table of means and draws a bar chart:

    python examples/posthoc_scores.py --summarize --run runs/cpu3 runs/cpu6 --plot posthoc.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np
import torch

from oodunleash import OODUnleash
from oodunleash.bench.grid import from_name, xi_value
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import in_batches, load_benchmark_data, subsample
from oodunleash.bench.run import load_checkpoint
from oodunleash.evaluation.results import format_mean_std, mean_std, save_figure, write_atomic
from oodunleash.scores import get_score

#: label -> detector; the labels keep the three DICE variants apart in one evaluation pass
SCORES = {
    "energy": "energy",
    "react": get_score("react", percentile=90.0),
    "dice0.5": get_score("dice", sparsity=0.5),
    "dice0.7": get_score("dice", sparsity=0.7),
    "dice0.9": get_score("dice", sparsity=0.9),
}


def evaluate(unleashed, data, split):
    """Percent metrics of every score in SCORES on one split, and the ID accuracy."""
    ood = {ood_name: in_batches(images) for ood_name, images in data[f"{split}_ood"].items()}
    result = unleashed.evaluate(in_batches(*data[split]), ood, SCORES, progress=False)
    out = {
        label: {o: {k: 100 * v for k, v in m.items()} for o, m in metrics.items()}
        for label, metrics in result.metrics.items()
    }
    out["accuracy"] = 100 * result.id_accuracy
    return out


#: file prefix -> what the scores were computed on; other prefixes are fine-tune names
VARIANTS = {"": "final model", "um_": "UM 3x", "control_": "UM's control (plain CE)"}
#: the fine-tunes behind --um and --control, with their file prefixes
SHORTCUTS = {"um_": "um/train_x3/lr0.01/ep10", "control_": "um/control/lr0.01/ep10"}


def file_prefix(finetune: str | None) -> str:
    """Result-file prefix of a fine-tune name (``""`` for the final model)."""
    if finetune is None:
        return ""
    short = {name: prefix for prefix, name in SHORTCUTS.items()}
    return short.get(finetune, finetune.replace("/", "_") + "_")


def summarize(
    runs: list[pathlib.Path], seeds: list[int] | None, plot: str | None, title: str = "small_cnn"
) -> None:
    """Means over seeds of the test metrics in the runs' result files: a table, and a plot."""
    found: dict[str, dict[int, dict]] = {prefix: {} for prefix in VARIANTS}
    labels = dict(VARIANTS)
    for run in runs:
        for path in sorted(run.glob("*posthoc_s*.json")):
            match = re.fullmatch(r"(.*)posthoc_s(\d+)\.json", path.name)
            if match is None:
                continue
            content = json.loads(path.read_text())
            prefix = match[1]
            found.setdefault(prefix, {})[int(match[2])] = content["test"]
            labels.setdefault(prefix, content.get("finetune") or prefix)
    found = {prefix: by_seed for prefix, by_seed in found.items() if by_seed}
    if not found:
        raise SystemExit(
            f"No posthoc_s*.json in {', '.join(map(str, runs))}: run the script first."
        )
    if seeds is None:
        seeds = sorted(set.intersection(*(set(by_seed) for by_seed in found.values())))
    missing = {
        labels[p]: sorted(set(seeds) - set(b)) for p, b in found.items() if set(seeds) - set(b)
    }
    if not seeds or missing:
        raise SystemExit(f"No seeds that every variant has, or some are missing: {missing}.")
    print(f"Test, seeds {seeds}: mean over OOD sets, then mean ± std over seeds\n")
    print("| scores on | score | ID acc | mean AUROC | mean FPR95 | near-OOD FPR95 |")
    print("|---|---|---|---|---|---|")
    bars: dict[str, dict[str, tuple[float, float]]] = {}
    for prefix, by_seed in found.items():
        rows = [by_seed[seed] for seed in seeds]
        for label in SCORES:
            fpr = [np.mean([m["fpr95"] for m in r[label].values()]) for r in rows]
            auroc = [np.mean([m["auroc"] for m in r[label].values()]) for r in rows]
            near = [r[label]["near"]["fpr95"] for r in rows]
            acc = [r["accuracy"] for r in rows]
            bars.setdefault(labels[prefix], {})[label] = mean_std(fpr)
            print(
                f"| {labels[prefix]} | {label} | {np.mean(acc):.2f} | {np.mean(auroc):.1f} "
                f"| {format_mean_std(fpr)} | {np.mean(near):.1f} |"
            )
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        width = 0.8 / len(bars)
        for i, (variant, by_score) in enumerate(bars.items()):
            x = np.arange(len(SCORES)) + (i - (len(bars) - 1) / 2) * width
            means, stds = zip(*(by_score[label] for label in SCORES), strict=True)
            ax.bar(x, means, width, yerr=stds, capsize=3, label=variant)
        ax.set_xticks(np.arange(len(SCORES)), list(SCORES))
        ax.set_ylabel("mean FPR95 over OOD sets (%, lower is better)")
        ax.set_title(f"{title}, Fashion-MNIST, test, seeds {', '.join(map(str, seeds))}")
        ax.set_ylim(0, 1.25 * max(m + sd for by in bars.values() for m, sd in by.values()))
        ax.legend(frameon=False, ncols=len(bars), loc="upper center")
        fig.tight_layout()
        save_figure(fig, plot, dpi=110)
        print(f"\nWrote {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, help="earlier benchmark --out folders")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    parser.add_argument("--setting", default="small_cnn", help="the benchmark setting run")
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--um", action="store_true", help="fine-tune with UM 3x first")
    first.add_argument("--control", action="store_true", help="the same fine-tune, plain CE")
    first.add_argument("--finetune", help="any benchmark fine-tune first, by its grid name")
    first.add_argument("--summarize", action="store_true", help="tabulate earlier results")
    parser.add_argument("--plot", help="with --summarize: save a bar chart here")
    args = parser.parse_args()
    runs = [pathlib.Path(r) for r in args.run]
    if args.summarize:
        summarize(runs, args.seeds, args.plot, args.setting)
        return
    if len(runs) > 1:
        parser.error("give one --run to compute results in (several only with --summarize)")
    shortcut = "um_" if args.um else "control_" if args.control else None
    finetune = SHORTCUTS[shortcut] if shortcut else args.finetune
    # Parsed before any model loads, so that a bad name fails at once.
    ft = from_name(finetune) if finetune is not None else None
    torch.set_num_threads(1)
    run = runs[0]
    args.seeds = args.seeds or [0, 1, 2]
    data = None
    for seed in args.seeds:
        tag = f"{args.setting}_s{seed}"
        result = json.loads((run / "seeds" / f"{tag}.json").read_text())
        if data is None:  # the training subsample the run used, so the fit set matches too
            data = load_benchmark_data("fashion-mnist", train_size=result["train_size"])
        torch.manual_seed(seed)  # as run_seed does before building the model
        model = create_model(result["model"], data["num_classes"])
        epochs = result["epochs"]
        load_checkpoint(model, run / "checkpoints" / tag / f"epoch{epochs:03d}.safetensors")
        if ft is not None:
            xi = None if ft.is_control else xi_value(result["xi"], ft.xi)
            if xi is None and not ft.is_control:  # else fit would use its default ξ silently
                raise SystemExit(
                    f"No ξ recipe {ft.xi.name!r} in {tag}.json (it has {sorted(result['xi'])}); "
                    "use one of those, 'control', or train_x<k>."
                )
            model = ft.fit(model, data["train"], xi, seed).export()
        unleashed = OODUnleash(model)
        unleashed.fit_scores(in_batches(*subsample(*data["train"], 10000, seed)), SCORES)
        out = {split: evaluate(unleashed, data, split) for split in ("val", "test")}
        out["finetune"] = finetune
        write_atomic(run / f"{file_prefix(finetune)}posthoc_s{seed}.json", json.dumps(out))
        fpr = {
            k: round(np.mean([m["fpr95"] for m in v.values()]), 1)
            for k, v in out["test"].items()
            if k != "accuracy"
        }
        print(f"seed {seed}: test accuracy {out['test']['accuracy']:.2f}, mean FPR95 {fpr}")


if __name__ == "__main__":
    main()
