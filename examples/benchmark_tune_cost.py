"""What does ``oodunleash.tune`` cost next to one ``fit``, and what does it choose?

On Fashion-MNIST (ID = classes 0-5, the benchmark's split), per model: train the classifier,
then time, in the same process and on the same data,

* one ``OODUnleash(model).fit(train_loader)`` at its defaults (UM, 10 epochs, then the KNN
  bank), and
* ``oodunleash.tune(model, train_loader, val_loader)`` at its defaults (every fine-tune
  screened, the best one fully trained, every registered score and variant; proxy OOD
  built from the validation images),

and print their ratio, with the test mean FPR95 over the benchmark's real OOD sets (never
seen by ``tune``) of tune's choice, of the default fit with its default score, and of the
trained model with Energy. One markdown row per model::

    PYTHONPATH=. nice -n 10 python examples/benchmark_tune_cost.py --models small_cnn resnet18
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time
from typing import Any

import torch

import oodunleash
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import (
    TensorLoader,
    in_batches,
    load_benchmark_data,
    train_classifier,
)


def _test_fpr95(unleashed: oodunleash.OODUnleash, data: dict[str, Any], score: Any) -> float:
    """Mean test FPR95 (%) of ``score`` over the real OOD sets, and the ID test accuracy."""
    test_id = in_batches(*data["test"], batch_size=512)
    test_ood = {name: in_batches(x, batch_size=512) for name, x in data["test_ood"].items()}
    results = unleashed.evaluate(test_id, test_ood, score, progress=False)
    (label,) = results.score_names
    return 100 * results.averages()[label]["fpr95"]


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    data = load_benchmark_data("fashion-mnist", train_size=args.train_size, eval_cap=args.eval_cap)
    torch.manual_seed(args.seed)
    model = create_model(name, data["num_classes"])
    train = TensorLoader(*data["train"], batch_size=128, seed=args.seed)
    train_classifier(model, train, epochs=args.train_epochs, progress=False)
    model.eval()
    val = in_batches(*data["val"], batch_size=512)

    started = time.perf_counter()
    fitted = oodunleash.OODUnleash(copy.deepcopy(model)).fit(train, progress=False)
    fit_s = time.perf_counter() - started

    started = time.perf_counter()
    result = oodunleash.tune(model, train, val, seed=args.seed, progress=False)
    tune_s = time.perf_counter() - started
    print(repr(result), flush=True)

    baseline = oodunleash.OODUnleash(model, score="energy")
    return {
        "model": name,
        "train_size": args.train_size,
        "fit_s": fit_s,
        "tune_s": tune_s,
        "ratio": tune_s / fit_s,
        "choice": result.best_name,
        "dropped": result.dropped,
        "choice_test_fpr95": _test_fpr95(result.best, data, None),
        "fit_test_fpr95": _test_fpr95(fitted, data, None),
        "energy_test_fpr95": _test_fpr95(baseline, data, "energy"),
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | one `fit` (s) | `tune` (s) | tune / fit | tune's choice | test FPR95: choice | "
        "default fit + KNN | trained model + Energy |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['fit_s']:.0f} | {r['tune_s']:.0f} | {r['ratio']:.2f}x | "
            f"{r['choice']} | {r['choice_test_fpr95']:.1f} | {r['fit_test_fpr95']:.1f} | "
            f"{r['energy_test_fpr95']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["small_cnn"])
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--train-epochs", type=int, default=10, help="of the classifier")
    parser.add_argument("--eval-cap", type=int, default=1000, help="validation and test sets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, help="append each row to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(run(name, args))
        print(table(rows[-1:]), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
