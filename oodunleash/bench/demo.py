"""End-to-end demo of the recommended path: train a small CNN, let :func:`oodunleash.tune`
choose the fine-tune and the OOD score on validation data, then compare on the test sets.

``tune`` sees the training images and the validation ID images only (its OOD sets are proxies
built from those validation images); the test OOD sets (near-OOD classes, digits or letters,
photo crops, noise) are only reported. Needs no download: it uses Fashion-MNIST when its files
are found (see :func:`oodunleash.bench.datasets.find_fashion_mnist`) and scikit-learn's digits
otherwise. Run it with ``oodunleash demo`` or ``python examples/demo.py``.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash.bench.demo_report import before_after_table, comparison_table, write_plots
from oodunleash.bench.models import SmallCNN
from oodunleash.bench.protocol import (
    TensorLoader,
    evaluate_model,
    load_benchmark_data,
    train_classifier,
)
from oodunleash.bench.run import save_checkpoint
from oodunleash.finetune.constraint import DEFAULT_CONSTRAINT_FACTOR, mean_cross_entropy
from oodunleash.runtime.files import write_atomic
from oodunleash.scores import list_scores
from oodunleash.tuning import TuneResult, tune
from oodunleash.wrapper import OODUnleash

__all__ = ["DEMO_SCORES", "run_demo"]

#: The scores the before/after table shows.
DEMO_SCORES: tuple[str, ...] = ("msp", "energy", "maxlogit", "knn")

#: Scores tune leaves out here: both need a backward pass per image (ODIN's input
#: perturbation, GradNorm's gradient), which on two CPU cores costs minutes per candidate.
SLOW_SCORES: tuple[str, ...] = ("odin", "gradnorm")

#: Printed by ``--quick``: its sizes are for tests, not for conclusions.
QUICK_NOTE = (
    "Quick mode: tiny data and 1-epoch fine-tunes; these numbers are NOT representative "
    "(run without --quick for the representative setting)."
)


def _pick_dataset(dataset: str) -> str:
    if dataset != "auto":
        return dataset
    from oodunleash.bench.fashion_mnist import fashion_mnist_available

    return "fashion-mnist" if fashion_mnist_available() else "digits"


def _sizes(dataset: str, quick: bool) -> tuple[int | None, int, int, int]:
    """Training images, training epochs, fine-tune epochs and evaluation-set cap.

    The demo's briefly trained model ends with a higher training loss than the benchmark's
    converged one, so next to the library's ξ it also tries ξ = 2x that loss; the measurements
    behind that are in docs/benchmarks/demo.md. A small subset trained longer fits its
    training set better than a larger one trained briefly. Capped evaluation sets keep the
    demo within minutes on two CPU cores.
    """
    cap = 200 if quick else 1000
    if dataset == "fashion-mnist":
        return (3000, 2, 1, cap) if quick else (4000, 15, 6, cap)
    return (None, 4, 1, cap) if quick else (None, 30, 10, cap)


def _finetunes(xi_factor: float, quick: bool) -> list[str]:
    """tune's fine-tune candidates: the library's UM and UMAP, their plain-CE controls, and
    UM and UMAP with the demo's ``xi_factor`` (the previous demo's setting). Quick mode: UM
    and its control only."""
    names = ["um", "umap", "um control", "umap control"]
    if quick:
        return ["um", "um control"]
    if xi_factor != DEFAULT_CONSTRAINT_FACTOR:
        names += [f"um {xi_factor:g}x", f"umap {xi_factor:g}x"]
    return names


def _tune_scores(quick: bool) -> list[str]:
    """Every registered score but :data:`SLOW_SCORES`; quick mode: :data:`DEMO_SCORES`."""
    if quick:
        return list(DEMO_SCORES)
    return [s for s in list_scores() if s not in SLOW_SCORES]


def _loader(images: torch.Tensor, labels: torch.Tensor | None = None) -> DataLoader:
    tensors = (images,) if labels is None else (images, labels)
    return DataLoader(TensorDataset(*tensors), batch_size=512)


class _Evaluator:
    """The library's evaluation on the demo's test sets, in percent:
    ``{"accuracy", "metrics": {score: {ood: {metric: %}}}}``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.id_test = _loader(*data["test"])
        self.oods = {name: _loader(images) for name, images in data["test_ood"].items()}
        self.fit_data = _loader(*data["train"])

    def __call__(self, unleashed: OODUnleash, scores: list[str]) -> dict[str, Any]:
        # Scores tune fitted (under their labels) are reused; the others are fitted here.
        res = unleashed.evaluate(
            self.id_test,
            self.oods,
            {s: s for s in scores},
            fit_loader=self.fit_data,
            progress=False,
        ).to_dict()
        metrics = {
            s: {o: {m: 100 * v for m, v in res[s][o].items()} for o in self.oods} for s in scores
        }
        return {"accuracy": 100 * res["id_accuracy"], "metrics": metrics}


def run_demo(
    out_dir: str | pathlib.Path = "oodunleash-demo",
    *,
    dataset: str = "auto",
    quick: bool = False,
    device: str = "cpu",
    seed: int = 0,
    xi_factor: float = 3.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a :class:`~oodunleash.bench.models.SmallCNN`, :func:`~oodunleash.tune` it on
    validation data, and compare tune's choice with the final model on the test sets.

    Args:
        out_dir: Where ``results.json``, ``results.md``, ``tune.md``, ``model.safetensors``
            and the plots (``curve.png``, ``compare.png``, ``tune.png``) go.
        dataset: ``"auto"`` (Fashion-MNIST if present, else digits), ``"fashion-mnist"`` or
            ``"digits"``.
        quick: A tiny configuration (small subsets, 1-epoch fine-tunes, fewer candidates) for
            tests; it prints that its numbers are not representative.
        device: Torch device.
        seed: Seeds the model, the data order, the fine-tunes and the proxy OOD sets.
        xi_factor: An extra UM and UMAP candidate with ξ = this multiple of the final
            training loss (see ``docs/benchmarks/demo.md``); it must stay well below
            ``ln(num_classes)``. Equal to the library's factor: no extra candidate.
        progress: Show tqdm progress bars.

    Returns:
        The content of ``results.json``: dataset, sizes, ξ, timings, tune's validation
        results, the test comparison and per-model test results.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    dataset = _pick_dataset(dataset)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"Dataset: {dataset}" + ("" if dataset == "fashion-mnist" else " (Fashion-MNIST not found)")
    )
    if quick:
        print(QUICK_NOTE)
    train_size, epochs, ft_epochs, cap = _sizes(dataset, quick)
    data = load_benchmark_data(dataset, train_size=train_size, ood_size=cap, eval_cap=cap)
    dev = torch.device(device)
    x, y = (t.to(dev) for t in data["train"])
    print(
        f"ID: {len(y)} training, {len(data['val'][1])} validation and {len(data['test'][1])} "
        f"test images of {data['num_classes']} classes; test OOD sets (never seen by tune): "
        + ", ".join(f"{n} ({len(v)})" for n, v in data["test_ood"].items())
    )
    batch = 64 if dataset == "digits" else 128
    model, curve = _train(data, x, y, batch, epochs, dev, seed, progress)
    save_checkpoint(model, out / "model.safetensors")
    train_loss = mean_cross_entropy(model, TensorLoader(x, y, 1024, shuffle=False))
    print(f"Final training loss {train_loss:.4f}")
    print("\n## tune: candidates on validation data (proxy OOD from validation ID images)")
    if not quick:
        print(f"Scores: all registered but {', '.join(SLOW_SCORES)} (a backward pass per image).")
    tuned = tune(
        model,
        TensorLoader(x, y, batch, seed=seed + 1),
        _loader(*(t.to(dev) for t in data["val"])),
        seed=seed,
        finetunes=_finetunes(xi_factor, quick),
        epochs=ft_epochs,
        proxy_size=cap,
        scores=_tune_scores(quick),
        keep_all=True,
        promote=None,  # every fine-tune fully trained: the test tables compare them all
        progress=progress,
    )
    print(f"\ntune chose: {tuned.best_name} ({tuned.time_s:.0f} s)")
    results, comparison = _test_results(tuned, _Evaluator(data))
    tables = _print_tables(results, comparison, tuned)
    wall = time.perf_counter() - started
    summary = {
        "dataset": dataset,
        "quick": quick,
        "train_size": len(y),
        "epochs": epochs,
        "fine_tune_epochs": ft_epochs,
        "train_loss": train_loss,
        "xi": {n: c.loss_constraint for n, c in tuned.candidates.items() if c.loss_constraint},
        "wall_time_s": wall,
        "curve": curve,
        "tune": tuned.to_dict(),
        "comparison": comparison,
        "results": results,
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_atomic(out / "results.md", tables + "\n")
    write_atomic(out / "tune.md", tuned.to_markdown(all_scores=True) + "\n")
    plots = write_plots(out, curve, results, tuned)
    written = ", ".join(["results.json", "results.md", "tune.md", *plots])
    print(f"Wrote {out}/: {written} ({wall:.0f} s)")
    if quick:
        print(QUICK_NOTE)
    return summary


def _train(
    data: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    epochs: int,
    device: torch.device,
    seed: int,
    progress: bool,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A fresh :class:`SmallCNN` trained with the library's loop; Energy AUROC per epoch."""
    model = SmallCNN(data["num_classes"]).to(device)

    def on_epoch(epoch: int) -> dict[str, Any]:
        ev = evaluate_model(model, data["test"], data["test_ood"], ("energy",))
        return {"auroc": {o: m["auroc"] for o, m in ev["metrics"]["energy"].items()}}

    curve = train_classifier(
        model,
        TensorLoader(x, y, batch, seed=seed),
        epochs=epochs,
        lr=0.05,
        device=device,
        on_epoch=on_epoch,
        progress=progress,
    )
    return model, curve


def _test_results(
    tuned: TuneResult, evaluate: _Evaluator
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every candidate tune fitted, read out on the test sets by :data:`DEMO_SCORES` (the
    chosen one also by its chosen score); and the comparison rows: the final model + Energy,
    UM + Energy, the library's defaults (UM + KNN), tune's choice."""
    results: dict[str, Any] = {}
    for name, unleashed in tuned.unleashed.items():
        extra = [tuned.best_score] if name == tuned.best_candidate else []
        scores = list(DEMO_SCORES) + [s for s in extra if s not in DEMO_SCORES]
        label = "final model" if name == "unchanged" else name
        results[label] = evaluate(unleashed, scores)
        if unleashed.masks_ is not None:
            unleashed.masks_.detach()

    def row(label: str, score: str) -> dict[str, Any]:
        res = results[label]
        return {"accuracy": res["accuracy"], "metrics": res["metrics"][score]}

    comparison = {"final model + energy": row("final model", "energy")}
    if "um" in results:
        comparison["um (library ξ) + energy"] = row("um", "energy")
        comparison["library defaults: um + knn"] = row("um", "knn")
    chosen = "final model" if tuned.best_candidate == "unchanged" else tuned.best_candidate
    comparison[f"tune's choice: {tuned.best_name}"] = row(chosen, tuned.best_score)
    for res in results.values():  # the before/after table shows the common scores only
        res["metrics"] = {s: res["metrics"][s] for s in DEMO_SCORES}
    return results, comparison


def _print_tables(
    results: dict[str, Any], comparison: dict[str, dict[str, Any]], tuned: TuneResult
) -> str:
    """Print and return the test comparison and the before/after table, with the verdict."""
    final, *_, chosen = comparison.values()

    def mean_fpr(row: dict[str, Any]) -> float:
        return sum(m["fpr95"] for m in row["metrics"].values()) / len(row["metrics"])

    change = mean_fpr(chosen) - mean_fpr(final)
    verdict = (
        f"On the test OOD sets, tune's choice ({tuned.best_name}) has mean FPR95 "
        f"{mean_fpr(chosen):.1f}% vs {mean_fpr(final):.1f}% for the final model + Energy: "
        + ("better" if change < 0 else "WORSE" if change > 0 else "the same")
        + f" by {abs(change):.1f} points; test accuracy {chosen['accuracy']:.2f}% vs "
        f"{final['accuracy']:.2f}%."
    )
    tables = "\n\n".join(
        [
            "## Test: tune's choice vs the final model (metrics in %, test OOD sets)",
            comparison_table(comparison),
            verdict,
            "## Test: every candidate, before/after (mean over the test OOD sets)",
            before_after_table(results, DEMO_SCORES),
        ]
    )
    print("\n" + tables)
    return "## tune: validation (proxy OOD)\n\n" + tuned.to_markdown() + "\n\n" + tables
