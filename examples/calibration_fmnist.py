"""Does the calibrated decision keep its promise on real data? Fashion-MNIST, ID = classes 0-5.

Protocol (the benchmark's split and small CNN, docs/benchmarks/setup.md):

* a small CNN is trained from scratch on the training split;
* the validation split (ID images never trained on) is cut in two halves: **tune** (where
  ``oodunleash.tune`` chooses a score, with proxy OOD built from those images only) and
  **calibration** (only ``calibrate`` sees it);
* two wrappers are calibrated on the calibration half: the library's default score (KNN, fitted
  on the training split) and tune's choice among the post-hoc scores on the trained model (all
  registered scores but ODIN and GradNorm, which back-propagate per image: slow on a CPU);
* on the test split: the share of ID test images flagged at alpha = 0.01 / 0.05 / 0.10 against
  alpha and its binomial margin, and the share of each real OOD test set flagged (the power):
  near-OOD (test images of classes 6-9), scikit-learn digits, photo crops, Gaussian and
  uniform noise. None of these takes part in training, tuning or calibration.

A control row calibrates on half of the ID test images and checks on the other half
(exchangeable by construction): if it keeps the bound where the real check does not, the
validation and test splits differ.

The margin: with n calibration and m test images the share flagged varies around its mean
floor(alpha (n+1)) / (n+1) <= alpha with a standard deviation of about
sqrt(alpha (1 - alpha) (1/n + 1/m)); the table gives alpha + 1.96 of it.

Run (CPU, single-threaded; docs/benchmarks/calibration.md has the result)::

    PYTHONPATH=. nice -n 10 python examples/calibration_fmnist.py --epochs 10 \
        --out runs/calibration.json
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import Any

import torch

import oodunleash
from oodunleash import OODUnleash
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import in_batches, load_benchmark_data, train_classifier
from oodunleash.decision import Calibration

ALPHAS = (0.01, 0.05, 0.10)
#: Scores that back-propagate per image: left out of tune's search to keep a CPU run short.
SLOW_SCORES = ("odin", "gradnorm")


def margin(alpha: float, n: int, m: int) -> float:
    """1.96 standard deviations of the share flagged (calibration set and test set)."""
    return 1.96 * math.sqrt(alpha * (1 - alpha) * (1 / n + 1 / m))


def measure(
    unleashed: OODUnleash, test: torch.Tensor, oods: dict[str, torch.Tensor], n: int
) -> list[dict[str, Any]]:
    """Per alpha: ID test share flagged, its bound, and each OOD set's share flagged. Each set
    is scored once: ``is_ood`` at level alpha is ``p_value <= alpha``."""
    on_id = unleashed.predict(in_batches(test, batch_size=512), ALPHAS[-1])
    p_id = on_id.p_values
    # Control: calibrate on one half of the test images, check on the other. Exchangeable by
    # construction, so a gap between this and the real check is a shift between the splits.
    halves = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    half_a, half_b = halves[: len(test) // 2], halves[len(test) // 2 :]
    p_control = Calibration(on_id.scores[half_a], "control").p_values(on_id.scores[half_b])
    p_ood = {
        name: unleashed.predict(in_batches(images, batch_size=512), ALPHAS[-1]).p_values
        for name, images in oods.items()
    }
    rows = []
    for alpha in ALPHAS:
        row: dict[str, Any] = {
            "alpha": alpha,
            "id_flagged": float((p_id <= alpha).double().mean()),
            "control_flagged": float((p_control <= alpha).double().mean()),
            "expected": math.floor(alpha * (n + 1)) / (n + 1),
            "bound": alpha + margin(alpha, n, len(test)),
            "threshold": unleashed.calibration_.threshold(alpha),
        }
        for name, p in p_ood.items():
            row[f"power_{name}"] = float((p <= alpha).double().mean())
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    oods = [k[len("power_") :] for k in results["rows"][0][0] if k.startswith("power_")]
    lines = [
        "| detector | alpha | ID test flagged | alpha + margin | control | "
        + " | ".join(f"{o} flagged" for o in oods)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(oods),
    ]
    for name, rows in zip(results["detectors"], results["rows"], strict=True):
        for r in rows:
            powers = " | ".join(f"{100 * r[f'power_{o}']:.1f}%" for o in oods)
            lines.append(
                f"| {name} | {r['alpha']:.2f} | {100 * r['id_flagged']:.2f}% | "
                f"{100 * r['bound']:.2f}% | {100 * r['control_flagged']:.2f}% | {powers} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the CNN")
    parser.add_argument("--train-size", type=int, help="subsample the training split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tune", action="store_true", help="only the default score")
    parser.add_argument("--out", default="runs/calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    data = load_benchmark_data("fashion-mnist", train_size=args.train_size, split_seed=args.seed)
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    test_x, _ = data["test"]
    half = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(args.seed))
    tune_idx, calib_idx = half[: len(half) // 2], half[len(half) // 2 :]
    calibration = val_x[calib_idx]
    print(f"train {len(train_x)}, tune {len(tune_idx)}, calibration {len(calibration)}, "
          f"test {len(test_x)}")  # fmt: skip

    model = create_model("small_cnn", data["num_classes"])
    train_loader = in_batches(train_x, train_y, batch_size=128)
    train_classifier(model, train_loader, epochs=args.epochs, progress=False)
    model.eval()
    print(f"trained: {time.perf_counter() - started:.0f}s")

    detectors: dict[str, OODUnleash] = {}
    default = OODUnleash(model)  # the library's default score (KNN), fitted on training data
    default.fit_scores(train_loader, [default.default_score], progress=False)
    detectors[f"default ({default.default_score})"] = default
    if not args.no_tune:
        result = oodunleash.tune(
            model,
            train_loader,
            in_batches(val_x[tune_idx], val_y[tune_idx], batch_size=512),
            finetunes=[],  # post-hoc scores on the trained model: minutes on a CPU
            scores=[s for s in oodunleash.list_scores() if s not in SLOW_SCORES],
            progress=False,
            verbose=False,
        )
        detectors[f"tune's choice ({result.best_name})"] = result.best
        print(f"tuned: {time.perf_counter() - started:.0f}s")

    rows = []
    for name, unleashed in detectors.items():
        unleashed.calibrate(in_batches(calibration, batch_size=512), progress=False)
        rows.append(measure(unleashed, test_x, data["test_ood"], len(calibration)))
        print(name, "done", f"{time.perf_counter() - started:.0f}s")
    results = {
        "command": "python examples/calibration_fmnist.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)
        ),
        "sizes": {"train": len(train_x), "calibration": len(calibration), "test": len(test_x)},
        "detectors": list(detectors),
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    print(markdown(results))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
