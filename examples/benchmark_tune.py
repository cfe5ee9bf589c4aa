"""Does ``oodunleash.tune`` choose well when it sees no real OOD data?

Protocol (Fashion-MNIST, ID = classes 0-5, the benchmark's split and small CNN):

* a small CNN is trained from scratch per seed on a seeded subsample of the training split;
* :func:`oodunleash.tune` sees the training subsample, the validation split and nothing else:
  its OOD sets are proxies built from the validation images (:func:`oodunleash.proxy_ood`);
* every candidate (the trained model, the fine-tunes) is then read out on the test split
  against real OOD sets that appear nowhere in tuning: near-OOD (test images of classes
  6-9), scikit-learn digits, photo crops, Gaussian and uniform noise, and rendered letters.

Reported per seed and as means over seeds: test mean FPR95 and ID accuracy of tune's choice
against the final model + Energy, the fixed default (``OODUnleash`` defaults: UM, ξ = 3x the
training loss, + Energy), UMAP's default + Energy, the best single post-hoc score on the
unchanged model (chosen on test: optimistic), and the oracle (the best candidate and score on
test within 1 point of the final model's test accuracy).

Run on CPU, single-threaded, beside other work (the measurement in docs/tutorials/tune.md ran
one process per seed, with a small training set to fit in the time 2 shared cores allowed)::

    for s in 0 1 2; do PYTHONPATH=. nice -n 10 python examples/benchmark_tune.py --seeds $s \
        --train-size 4000 --epochs 25 --finetune-epochs 3 --eval-cap 1000 --proxy-size 500 \
        --out runs/tune & done; wait
    python examples/benchmark_tune.py --summarize runs/tune   # the table again, from the JSONs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import torch

import oodunleash

# The benchmark's data, model and training loop, imported in this one place (they may move
# into an ``oodunleash.bench`` package; only these lines would change).
from oodunleash.bench.datasets import GlyphsOOD
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import (
    TensorLoader,
    in_batches,
    load_benchmark_data,
    train_classifier,
)
from oodunleash.scores import ScoreSpec
from oodunleash.tuning.candidates import TIERS
from oodunleash.tuning.reader import split_failures
from oodunleash.tuning.result import CandidateResult, metrics_in_percent, recipe_name, select

#: Candidates compared as fixed recipes (candidate, score) beside tune's choice.
FIXED = {
    "final model + energy": ("unchanged", "energy"),
    "default UM + energy": ("um", "energy"),
    "default UMAP + energy": ("umap", "energy"),
}


def _test_metrics(unleashed: oodunleash.OODUnleash, test_id, test_ood) -> dict[str, Any]:
    """Test accuracy and metrics in %, laid out like tune's validation metrics; a score that
    fails on some test set (a NaN) is listed under ``"failed"``."""

    def run(labels: list[str]) -> oodunleash.EvaluationResults:
        scores = {label: label for label in labels}
        return unleashed.evaluate(test_id, test_ood, scores, progress=False)

    parts, failed = split_failures(list(unleashed.fitted_scores_), run)
    metrics = {label: m for part in parts for label, m in part.metrics.items()}
    return {
        "accuracy": 100 * parts[0].id_accuracy,
        "scores": metrics_in_percent(metrics),
        "failed": {label: str(err) for label, err in failed.items()},
    }


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train, tune on proxies, read every candidate out on the real test sets."""
    started = time.perf_counter()
    data = load_benchmark_data(
        "fashion-mnist", train_size=args.train_size, eval_cap=args.eval_cap, split_seed=0
    )
    test_ood = dict(data["test_ood"])
    letters = GlyphsOOD(args.eval_cap or 2000, seed=0)  # a family absent from tuning
    test_ood["letters"] = letters.tensors()[0]
    torch.manual_seed(seed)
    model = create_model(args.model, data["num_classes"])
    train = TensorLoader(*data["train"], batch_size=128, seed=seed)
    train_classifier(model, train, epochs=args.epochs, progress=False)
    trained_s = time.perf_counter() - started

    result = oodunleash.tune(
        model,
        train,
        in_batches(*data["val"], batch_size=512),
        seed=seed,
        epochs=args.finetune_epochs,
        time_budget=args.time_budget,
        proxy_size=args.proxy_size,
        finetunes=args.finetunes,
        scores=[s for s in oodunleash.list_scores() if s not in args.skip_scores],
        keep_all=True,
        promote=None,  # every candidate fully trained: each is read out on test below
        progress=False,
    )
    test_id = in_batches(*data["test"], batch_size=512)
    test_sets = {k: in_batches(v, batch_size=512) for k, v in test_ood.items()}
    test = {
        name: _test_metrics(unleashed, test_id, test_sets)
        for name, unleashed in result.unleashed.items()
    }
    return {
        "seed": seed,
        "settings": vars(args) | {"seeds": None},
        "train_s": trained_s,
        "tune_s": result.time_s,
        "val": result.to_dict(),
        "test": test,
        "chosen": [result.best_candidate, result.best_score],
    }


#: The test OOD set of the held-out Fashion-MNIST classes: near-OOD, reported on its own.
NEAR = "near"


def is_fused(label: str) -> bool:
    """Whether a score label is a fused score (``"knn k=1 + energy"``, ``"fused"``)."""
    return ScoreSpec.parse(label).name == "fused"


def val_choice(
    run: dict[str, Any], fused: bool = True, finetunes: bool = True, floor: bool = True
) -> tuple[str, str]:
    """``(candidate, score)`` that tune's rule picks from the run's validation metrics: with or
    without the fused variants and the fine-tunes; ``floor=False`` ignores the accuracy floor
    (an OOD reader whose accuracy does not matter: the classifier keeps its own weights)."""
    rows = []
    for name, block in run["val"]["candidates"].items():
        if not finetunes and block["kind"] == "finetune":
            continue
        metrics = {s: m for s, m in block["scores"].items() if fused or not is_fused(s)}
        kind = block["kind"]
        rows.append(CandidateResult(name, kind, TIERS[kind], block["accuracy"], metrics))
    drop = run["val"]["max_accuracy_drop"] if floor else float("inf")
    chosen = select(rows, drop)[0]
    return chosen.name, chosen.best_score


def _entry(run: dict[str, Any], candidate: str, score: str) -> tuple[float, float]:
    """Test mean FPR95 and accuracy; NaN FPR95 where the score failed on test."""
    block = run["test"][candidate]
    scores = block["scores"]
    return scores[score]["mean"]["fpr95"] if score in scores else float("nan"), block["accuracy"]


def _rows(run: dict[str, Any], fixed_posthoc: str | None) -> dict[str, tuple[str, float, float]]:
    """``{row: (what, test mean FPR95, test accuracy)}`` for one seed."""
    rows = {}
    for row, (candidate, score) in FIXED.items():
        if candidate in run["test"]:
            rows[row] = (recipe_name(candidate, score), *_entry(run, candidate, score))
    unchanged = run["test"]["unchanged"]
    if fixed_posthoc is not None:
        rows["best single post-hoc score on the final model (test)"] = (
            f"unchanged + {fixed_posthoc}",
            *_entry(run, "unchanged", fixed_posthoc),
        )
    for row, options in {
        "tune, unchanged model, single scores": {"fused": False, "finetunes": False},
        "tune, unchanged model, with fusion": {"finetunes": False},
        "tune, single scores only": {"fused": False},
    }.items():
        candidate, score = val_choice(run, **options)
        rows[row] = (recipe_name(candidate, score), *_entry(run, candidate, score))
    candidate, score = run["chosen"]
    rows["tune's choice"] = (recipe_name(candidate, score), *_entry(run, candidate, score))
    # The OOD score read from the best copy on validation whatever its accuracy, while the
    # classifier keeps the unchanged weights (one more forward pass at inference).
    candidate, score = val_choice(run, floor=False)
    rows["OOD read from a fine-tuned copy, classifier unchanged"] = (
        f"{recipe_name(candidate, score)} (classifier: unchanged)",
        _entry(run, candidate, score)[0],
        unchanged["accuracy"],
    )
    floor = unchanged["accuracy"] - 1.0
    oracle = min(
        (block["scores"][s]["mean"]["fpr95"], c, s)
        for c, block in run["test"].items()
        if block["accuracy"] >= floor
        for s in block["scores"]
    )
    rows["oracle (best on test)"] = (recipe_name(*oracle[1:]), *_entry(run, *oracle[1:]))
    return rows


def summarize(runs: list[dict[str, Any]]) -> str:
    """Markdown: per seed, then means over seeds."""
    shared = set.intersection(*(set(r["test"]["unchanged"]["scores"]) for r in runs))
    shared = {label for label in shared if not is_fused(label)}  # the best *single* score
    fixed_posthoc = min(
        shared,
        key=lambda s: sum(r["test"]["unchanged"]["scores"][s]["mean"]["fpr95"] for r in runs),
    )
    per_seed = {r["seed"]: _rows(r, fixed_posthoc) for r in runs}
    names = list(next(iter(per_seed.values())))
    lines = [
        f"Seeds {sorted(per_seed)}; test mean FPR95 over {len(runs[0]['test']['unchanged']['scores']['energy']) - 1} "
        "real OOD sets (%), ID test accuracy (%).",
        "",
        "| recipe | test mean FPR95 | Δ vs final + energy | test accuracy | Δ accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    base = [per_seed[s]["final model + energy"] for s in per_seed]
    for name in names:
        got = [per_seed[s][name] for s in per_seed if name in per_seed[s]]
        fpr = sum(g[1] for g in got) / len(got)
        acc = sum(g[2] for g in got) / len(got)
        base_fpr = sum(b[1] for b in base) / len(base)
        base_acc = sum(b[2] for b in base) / len(base)
        lines.append(
            f"| {name} | {fpr:.1f} | {100 * (fpr - base_fpr) / base_fpr:+.0f}% | {acc:.2f} | "
            f"{acc - base_acc:+.2f} |"
        )
    lines += [
        "",
        "| seed | recipe | chosen | test mean FPR95 | test accuracy |",
        "|---|---|---|---:|---:|",
    ]
    for seed, rows in per_seed.items():
        for name, (what, fpr, acc) in rows.items():
            lines.append(f"| {seed} | {name} | {what} | {fpr:.1f} | {acc:.2f} |")
    lines += ["", "Per OOD set, test FPR95 (%), final model + energy → tune's choice:", ""]
    for r in runs:
        candidate, score = r["chosen"]
        before = r["test"]["unchanged"]["scores"]["energy"]
        after = r["test"][candidate]["scores"][score]
        sets = [o for o in before if o != "mean"]
        cells = ", ".join(f"{o} {before[o]['fpr95']:.1f} → {after[o]['fpr95']:.1f}" for o in sets)
        lines.append(f"- seed {r['seed']}: {cells}")
    return "\n".join(lines)


def _under(run: dict[str, Any], candidate: str, score: str) -> tuple[float, ...]:
    """Validation FPR95, test FPR95 and near-OOD test FPR95 of one candidate under one score,
    and its validation and test accuracy changes against the unchanged model."""
    val, test = run["val"]["candidates"], run["test"]
    metrics = test[candidate]["scores"][score]
    return (
        val[candidate]["scores"][score]["mean"]["fpr95"],
        metrics["mean"]["fpr95"],
        metrics[NEAR]["fpr95"],
        val[candidate]["accuracy"] - val["unchanged"]["accuracy"],
        test[candidate]["accuracy"] - test["unchanged"]["accuracy"],
    )


def finetune_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: every candidate under the unchanged model's best single score on validation
    (per seed) and under Energy, means over seeds: does the fine-tune add to the best score,
    and does it add more than its plain cross-entropy control?"""
    best = {r["seed"]: val_choice(r, fused=False, finetunes=False)[1] for r in runs}
    names = list(dict.fromkeys(c for r in runs for c in r["test"]))
    lines = [
        "Under the best single score on the unchanged model, chosen on validation per seed "
        f"({', '.join(f'seed {k}: {v}' for k, v in best.items())}), and under Energy; means "
        "over the seeds that ran the candidate, FPR95 and accuracy changes in %.",
        "",
        "| candidate | val FPR95 | test FPR95 | near-OOD | Energy: test FPR95 | Energy: "
        "near-OOD | Δ val acc | Δ test acc | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        ran = [r for r in runs if name in r["test"]]
        rows = [_under(r, name, best[r["seed"]]) for r in ran]
        energy = [_under(r, name, "energy") for r in ran]
        mean = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
        mean_energy = [sum(column) / len(energy) for column in zip(*energy, strict=True)]
        lines.append(
            f"| {name} | {mean[0]:.1f} | {mean[1]:.1f} | {mean[2]:.1f} | {mean_energy[1]:.1f} "
            f"| {mean_energy[2]:.1f} | {mean[3]:+.2f} | {mean[4]:+.2f} | {len(ran)} |"
        )
    return "\n".join(lines)


def score_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: every score with its registered defaults on the unchanged model, and the fused
    variants tune built there, means over seeds; validation (proxy) and test side by side."""
    shared = set.intersection(*(set(r["test"]["unchanged"]["scores"]) for r in runs))
    labels = [s for s in shared if is_fused(s) or not ScoreSpec.parse(s).options]

    def mean(label: str, split: str, ood: str = "mean") -> float:
        blocks = [r["val"]["candidates"] if split == "val" else r["test"] for r in runs]
        sets = [b["unchanged"]["scores"][label] for b in blocks]
        return sum(m[ood]["fpr95"] for m in sets) / len(sets)

    lines = [
        f"The unchanged model, scores at their registered defaults and tune's fused variants; "
        f"FPR95 in %, means over {len(runs)} seeds; sorted by test.",
        "",
        "| score | val FPR95 (proxies) | test FPR95 | near-OOD |",
        "|---|---:|---:|---:|",
    ]
    for label in sorted(labels, key=lambda s: mean(s, "test")):
        lines.append(
            f"| {label} | {mean(label, 'val'):.1f} | {mean(label, 'test'):.1f} | "
            f"{mean(label, 'test', NEAR):.1f} |"
        )
    return "\n".join(lines)


def _recipe_table(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple]]:
    """``{(candidate, score): [(val FPR95, val Δacc, test FPR95, test Δacc) per run]}``, the
    accuracy changes against the unchanged model of the same run; only recipes every run has."""
    table: dict[tuple[str, str], list[tuple]] = {}
    for run in runs:
        candidates = run["val"]["candidates"]
        val_ref = candidates["unchanged"]["accuracy"]
        test_ref = run["test"]["unchanged"]["accuracy"]
        for candidate, block in candidates.items():
            tested = candidate in run["test"]
            for score, metrics in block.get("scores", {}).items():
                nan = float("nan")
                test_fpr, test_acc = _entry(run, candidate, score) if tested else (nan, nan)
                table.setdefault((candidate, score), []).append((
                    metrics["mean"]["fpr95"], block["accuracy"] - val_ref, test_fpr,
                    test_acc - test_ref,
                ))  # fmt: skip
    return {recipe: rows for recipe, rows in table.items() if len(rows) == len(runs)}


def fixed_recipes(groups: dict[str, list[dict[str, Any]]], max_drop: float = 1.0, top: int = 8):
    """Markdown: which one fixed recipe (candidate + score) a default should be, chosen on
    validation only (proxy OOD), pooled over every model and seed; test shown beside it.

    A recipe is eligible when its mean validation accuracy change is within ``max_drop``
    points; the ranking is by mean validation FPR95 over all runs of all models."""
    tables = {pathlib.Path(name).name: _recipe_table(runs) for name, runs in groups.items()}
    shared = set.intersection(*(set(t) for t in tables.values()))

    def mean(name: str, recipe: tuple[str, str], column: int) -> float:
        rows = tables[name][recipe]
        return sum(r[column] for r in rows) / len(rows)

    pooled = {
        recipe: (
            sum(mean(n, recipe, 0) for n in tables) / len(tables),
            min(mean(n, recipe, 1) for n in tables),
        )
        for recipe in shared
    }
    # Ties at the reported precision go to the cheaper recipe: no fine-tune first.
    eligible = sorted(
        ((round(fpr, 1), recipe[0] != "unchanged"), recipe)
        for recipe, (fpr, drop) in pooled.items()
        if drop >= -max_drop
    )
    reference = [("unchanged", "energy"), ("um", "energy"), ("umap", "energy")]
    shown = [recipe for _, recipe in eligible[:top]] + [r for r in reference if r in shared]
    header = " | ".join(f"{n}: val FPR95 / Δacc | {n}: test FPR95 / Δacc" for n in tables)
    lines = [
        f"Fixed recipes ranked on validation (proxy OOD) over {', '.join(tables)}; eligible: "
        f"mean validation accuracy within {max_drop:g} point of the unchanged model on every "
        "model. Test columns are reported, not used.",
        "",
        f"| rank | recipe | pooled val FPR95 | {header} |",
        "|---:|---|---:|" + "---:|---:|" * len(tables),
    ]
    ranks = {recipe: i + 1 for i, (_, recipe) in enumerate(eligible)}
    for recipe in dict.fromkeys(shown):
        cells = " | ".join(
            f"{mean(n, recipe, 0):.1f} / {mean(n, recipe, 1):+.2f} | "
            f"{mean(n, recipe, 2):.1f} / {mean(n, recipe, 3):+.2f}"
            for n in tables
        )
        rank = ranks.get(recipe, "not eligible")
        lines.append(f"| {rank} | {recipe_name(*recipe)} | {pooled[recipe][0]:.1f} | {cells} |")
    return "\n".join(lines)


def _read_runs(folder: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(pathlib.Path(folder).glob("seed*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", choices=["small_cnn", "resnet18"], default="small_cnn")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the model")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--proxy-size", type=int, default=1000, help="images per proxy family")
    parser.add_argument(
        "--eval-cap", type=int, default=None, help="at most this many images per val/test set"
    )
    parser.add_argument(
        "--finetunes",
        nargs="*",
        default=None,
        help="tune's fine-tunes (default: tune's own; none: the unchanged model's scores only)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="per tune call (s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--skip-scores",
        nargs="*",
        default=["odin"],
        help="registered scores left out (ODIN costs three passes per batch)",
    )
    parser.add_argument(
        "--summarize",
        metavar="DIR",
        nargs="+",
        help="only print the summary of each DIR (one model each) and, for several, the fixed "
        "recipes ranked on validation over all of them",
    )
    args = parser.parse_args()
    if args.summarize:
        groups = {folder: _read_runs(folder) for folder in args.summarize}
        for folder, runs in groups.items():
            tables = [summarize(runs), finetune_table(runs), score_table(runs)]
            print(f"## {folder}\n\n" + "\n\n".join(tables) + "\n")
        print(fixed_recipes(groups))
        return
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        run = run_seed(seed, args)
        (out / f"seed{seed}.json").write_text(json.dumps(run, indent=1))
        runs.append(run)
        print(summarize(runs), flush=True)
    (out / "summary.md").write_text(summarize(runs) + "\n")


if __name__ == "__main__":
    main()
