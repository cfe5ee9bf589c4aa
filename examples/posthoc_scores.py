"""Post-hoc ReAct and DICE on the benchmark's final small-CNN models, with and without UM.

ReAct (clip the penultimate activations) and DICE (drop the head weights with the smallest
contributions) try to make the Energy score a better OOD detector without any training; UM
tries the same by fine-tuning. This script measures both on the models of an earlier
``oodunleash benchmark --checkpoints final`` run (its per-seed JSON and
``checkpoints/small_cnn_s<seed>/epoch025.safetensors``):

* the final model with Energy, ReAct (90th percentile) and DICE at 50%, 70% and 90% sparsity,
  on the validation and the test split (choose the sparsity on validation);
* with ``--um``, the same scores after UM with ξ = 3x the stored training loss, fine-tuned
  exactly as the benchmark's ``um/train_x3/lr0.01/ep10`` row (same seeds, same loader), so its
  Energy numbers can be checked against that row;
* with ``--control``, the same after that fine-tune without the constraint (plain
  cross-entropy, the benchmark's ``um/control/lr0.01/ep10`` row): whether a post-hoc score's
  gain after UM is UM's doing or any fine-tune's.

Scores that learn from ID data are fitted on the benchmark's 10,000 training images of the
seed. Results go to ``<run>/posthoc_s<seed>.json`` (``um_posthoc_s<seed>.json`` with ``--um``,
``control_posthoc_s<seed>.json`` with ``--control``).

    OODUNLEASH_FASHION_MNIST=/usr/share/datasets/fashion-mnist \\
    python examples/posthoc_scores.py --run runs/cpu3 --seeds 0 1 2 [--um | --control]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch

from oodunleash import OODUnleash
from oodunleash.benchmark import (
    CONTROL_XI,
    TensorLoader,
    _batches,
    _subsample,
    load_benchmark_data,
    load_checkpoint,
)
from oodunleash.models import create_model
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
    ood = {ood_name: _batches(images) for ood_name, images in data[f"{split}_ood"].items()}
    result = unleashed.evaluate(_batches(*data[split]), ood, SCORES, progress=False)
    out = {
        label: {o: {k: 100 * v for k, v in m.items()} for o, m in metrics.items()}
        for label, metrics in result.metrics.items()
    }
    out["accuracy"] = 100 * result.id_accuracy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="an earlier benchmark --out folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--um", action="store_true", help="fine-tune with UM 3x first")
    first.add_argument("--control", action="store_true", help="the same fine-tune, plain CE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = pathlib.Path(args.run)
    data = load_benchmark_data("fashion-mnist")
    for seed in args.seeds:
        result = json.loads((run / "seeds" / f"small_cnn_s{seed}.json").read_text())
        torch.manual_seed(seed)  # as run_seed does before building the model
        model = create_model("small_cnn", data["num_classes"])
        load_checkpoint(model, run / "checkpoints" / f"small_cnn_s{seed}" / "epoch025.safetensors")
        if args.um or args.control:
            OODUnleash(model, "um", seed=seed).fit(
                TensorLoader(*data["train"], 128, shuffle=True, seed=seed + 1),
                epochs=10,
                lr=0.01,
                # The benchmark's control floods at 1e-12: plain cross-entropy, same numbers.
                loss_constraint=CONTROL_XI if args.control else 3 * result["xi"]["train_loss"],
                progress=False,
            )
        unleashed = OODUnleash(model)
        unleashed.fit_scores(_batches(*_subsample(*data["train"], 10000, seed)), SCORES)
        out = {split: evaluate(unleashed, data, split) for split in ("val", "test")}
        prefix = "um_" if args.um else "control_" if args.control else ""
        name = f"{prefix}posthoc_s{seed}.json"
        (run / name).write_text(json.dumps(out))
        fpr = {
            k: round(np.mean([m["fpr95"] for m in v.values()]), 1)
            for k, v in out["test"].items()
            if k != "accuracy"
        }
        print(f"seed {seed}: test accuracy {out['test']['accuracy']:.2f}, mean FPR95 {fpr}")


if __name__ == "__main__":
    main()
