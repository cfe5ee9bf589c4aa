"""The benchmark's protocol: its data (tensors in memory), its scores, and how it trains a
classifier from scratch.

* ID data: Fashion-MNIST classes 0-5; 10% of their training images are held out as the
  validation split. Test near-OOD: the *test* images of classes 6-9. Test far-OOD: scikit-learn
  digits, grayscale photo crops and Gaussian / uniform noise generated with seed 0.
* Every choice (ξ recipe, learning rate) is made on validation data only: ID validation
  images against validation OOD sets that share no image with the test sets (training images of
  classes 6-9, photo crops and noise generated with seed 1).
* Scores and metrics are the library's (:meth:`OODUnleash.evaluate`), computed on the device
  the model lives on; training from scratch is the library's own loop
  (:func:`oodunleash.finetune.loop.train` without a loss constraint).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oodunleash.finetune.loop import TrainConfig, train
from oodunleash.scores import get_score
from oodunleash.wrapper import OODUnleash

__all__ = [
    "ALL_SCORES",
    "TensorLoader",
    "evaluate_model",
    "in_batches",
    "load_benchmark_data",
    "noisy_labels",
    "subsample",
    "train_classifier",
]

#: OOD scores the benchmark reports (higher = more in-distribution).
ALL_SCORES: tuple[str, ...] = (
    "msp",
    "energy",
    "maxlogit",
    "odin",
    "mahalanobis",
    "knn",
    "react",
    "dice",
)


class TensorLoader:
    """Mini-batches of in-memory tensors, reshuffled every epoch; has ``len()``.

    Much faster than a ``DataLoader`` for small images already on the device.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.images[idx], self.labels[idx]


def _tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors()
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.as_tensor(labels)


def subsample(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random ``n`` of the samples (all of them when ``n`` is ``None`` or too big)."""
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def load_benchmark_data(
    dataset: str = "fashion-mnist",
    *,
    train_size: int | None = None,
    ood_size: int = 2000,
    eval_cap: int | None = None,
    split_seed: int = 0,
) -> dict[str, Any]:
    """The tensors of the benchmark protocol (module docstring), on the CPU.

    Args:
        dataset: ``"fashion-mnist"`` (classes 0-5 ID) or ``"digits"`` (scikit-learn digits
            0-5 ID; the fallback when Fashion-MNIST is missing).
        train_size: Subsample the ID training split to this many images (``None``: all).
        ood_size: Size of the generated far-OOD sets (photos, noise), and the cap on the
            validation near-OOD set.
        eval_cap: Subsample every validation and test set to at most this many images
            (smoke tests and demos; ``None``: all).
        split_seed: Seed of the train/validation partition and of the subsample.

    Returns:
        ``{"train", "val", "test"}``: ``(images, labels)``; ``"val_ood"``, ``"test_ood"``:
        name → images; ``"num_classes"``, ``"dataset"``.
    """
    from oodunleash.bench import datasets as ds

    ids = (0, 1, 2, 3, 4, 5)
    if dataset == "fashion-mnist":
        splits = ds.near_ood_split(ids, val_fraction=0.1, seed=split_seed)
        held_back = tuple(c for c in range(10) if c not in ids)
        # Training images of the held-back classes: never in any test set.
        val_near = _tensors(ds.FashionMNIST("train", held_back, ood_label=-1))[0]
        test_far = ds.ood_sets("fashion-mnist", n=ood_size, seed=0)
    elif dataset == "digits":
        splits = ds.digits_near_ood_split(ids, val_fraction=0.2, seed=split_seed)
        held_back = tuple(c for c in range(10) if c not in ids)
        val_near = torch.cat(
            [
                _tensors(ds.DigitsID(s, held_back, val_fraction=0.2, seed=split_seed))[0]
                for s in ("train", "val")
            ]
        )
        test_far = ds.ood_sets("digits", n=ood_size, seed=0)
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'digits', got {dataset!r}.")
    val_near = subsample(val_near, torch.zeros(len(val_near)), ood_size, split_seed + 1)[0]
    # Same generators, another seed: disjoint images for validation.
    val_far = {
        "photos": _tensors(ds.SamplePhotoCrops(ood_size, seed=1))[0],
        "gaussian": _tensors(ds.NoiseOOD("gaussian", ood_size, seed=1))[0],
        "uniform": _tensors(ds.NoiseOOD("uniform", ood_size, seed=1))[0],
    }
    train = subsample(*_tensors(splits["train"]), train_size, split_seed)

    def cap(images: Tensor, labels: Tensor | None = None) -> Any:
        dummy = torch.zeros(len(images)) if labels is None else labels
        x, y = subsample(images, dummy, eval_cap, split_seed + 2)
        return x if labels is None else (x, y)

    return {
        "dataset": dataset,
        "num_classes": len(ids),
        "train": train,
        "val": cap(*_tensors(splits["val"])),
        "test": cap(*_tensors(splits["test"])),
        "val_ood": {k: cap(v) for k, v in ({"near": val_near} | val_far).items()},
        "test_ood": {"near": cap(_tensors(splits["ood"])[0])}
        | {k: cap(_tensors(v)[0]) for k, v in test_far.items()},
    }


#: The detectors :func:`evaluate_model` reports, with the benchmark's settings: ODIN with
#: T = 1000 and ε = 0.0014 taken in the model's (normalised) input space, KNN with k = 50 on
#: L2-normalised penultimate features, Mahalanobis with class means and one shared covariance,
#: ReAct clipping at the 90th percentile, and DICE dropping 70% of the head's weights (chosen
#: on the validation split of the small CNN's seeds 0-2 among 50/70/90%; see docs/benchmarks.md).
_SCORE_CONFIG: dict[str, dict[str, Any]] = {
    "odin": {"temperature": 1000.0, "epsilon": 0.0014},
    "knn": {"k": 50},
    "dice": {"sparsity": 0.7},
}


def in_batches(images: Tensor, labels: Tensor | None = None, batch_size: int = 1024) -> list[Any]:
    """In-memory batches in order: images, or ``(images, labels)``."""
    if labels is None:
        return list(images.split(batch_size))
    return list(zip(images.split(batch_size), labels.split(batch_size), strict=True))


def evaluate_model(
    model: nn.Module,
    id_set: tuple[Tensor, Tensor],
    ood_sets: dict[str, Tensor],
    scores: Sequence[str] = ALL_SCORES,
    *,
    fit_set: tuple[Tensor, Tensor] | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """ID accuracy and OOD metrics of ``model`` (eval mode, left as it was), computed by the
    library's detectors and metrics (:meth:`OODUnleash.evaluate`), in percent.

    Args:
        model: The classifier.
        id_set: ID ``(images, labels)``.
        ood_sets: Name → OOD images.
        scores: Score names (see :data:`ALL_SCORES`).
        fit_set: ID training ``(images, labels)`` that the scores which learn from ID data
            (Mahalanobis, KNN, ReAct, DICE, ...) are fitted on.
        num_classes: Number of classes; every one must appear in ``fit_set`` (Mahalanobis
            keeps one mean per class).
        device: Unused: the model is run where its parameters are (kept for callers).

    Returns:
        ``{"accuracy": %, "metrics": {score: {ood: {"auroc", "aupr_in", "aupr_out",
        "fpr95"}}}}``, every metric in percent (FPR95: OOD accepted at 95% ID kept).
    """
    del device  # the library runs the model on its own device
    detectors = [get_score(name, **_SCORE_CONFIG.get(name, {})) for name in scores]
    fitted = [d.name for d in detectors if d.needs_fit]
    fit_loader = None
    if fitted:
        if fit_set is None or num_classes is None:
            raise ValueError(
                f"The scores {fitted} learn from ID training data: pass fit_set and num_classes."
            )
        if any("labels" in d.requires for d in detectors):  # e.g. Mahalanobis' class means
            missing = set(range(num_classes)) - set(fit_set[1].tolist())
            if missing:
                raise ValueError(f"fit_set has no image of class(es) {sorted(missing)}.")
        fit_loader = in_batches(*fit_set)
    results = OODUnleash(model).evaluate(
        in_batches(*id_set),
        {name: in_batches(images) for name, images in ood_sets.items()},
        detectors,
        fit_loader=fit_loader,
        progress=False,
    )
    metrics = {
        s: {o: {k: 100 * v for k, v in per_metric.items()} for o, per_metric in per_ood.items()}
        for s, per_ood in results.metrics.items()
    }
    return {"accuracy": 100 * results.id_accuracy, "metrics": metrics}


def noisy_labels(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """``labels`` with a seeded ``rate`` of them flipped to one of the *other* classes
    (symmetric label noise); ``labels`` themselves when ``rate`` is 0."""
    if rate <= 0:
        return labels
    g = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(len(labels), generator=g) < rate
    shift = torch.randint(1, num_classes, (len(labels),), generator=g)
    return torch.where(flip, (labels + shift) % num_classes, labels)


class _EpochEnd:
    """``loader`` that calls ``callback(epoch)`` (1-based) each time a pass over it ends: the
    library's loop has finished that epoch's last step when it asks for the next batch."""

    def __init__(self, loader: Any, callback: Callable[[int], Any]) -> None:
        self.loader, self.callback, self.epoch = loader, callback, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        yield from self.loader
        self.epoch += 1
        self.callback(self.epoch)


def train_classifier(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int], dict[str, Any] | None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train ``model`` from scratch with the library's loop (:func:`oodunleash.finetune.loop.train`
    with plain cross-entropy): SGD (momentum 0.9, Nesterov), cosine per step to zero.

    Args:
        model: The classifier, moved to ``device``.
        loader: ``(images, labels)`` batches with ``len()``.
        epochs, lr, weight_decay: The recipe.
        device: Where to train.
        on_epoch: Called as ``on_epoch(epoch)`` (1-based) when an epoch's last step is done,
            e.g. to checkpoint or evaluate; a dict it returns joins that epoch's record.
        progress: Show progress bars.
        desc: Progress bar label.

    Returns:
        One record per epoch: ``epoch``, ``loss``, ``accuracy`` (percent, on the training
        batches), ``time_s`` (the epoch, ``on_epoch`` included), and what ``on_epoch`` returned.
    """
    device = torch.device(device)
    model.to(device)
    extras: dict[int, dict[str, Any]] = {}
    if on_epoch is not None:
        loader = _EpochEnd(loader, lambda epoch: extras.__setitem__(epoch, on_epoch(epoch) or {}))
    history = train(
        model,
        list(model.parameters()),
        loader,
        loss_constraint=None,
        config=TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay),
        device=device,
        progress=progress,
        desc=desc,
    )
    return [
        {
            "epoch": r["epoch"],
            "loss": r["loss"],
            "accuracy": 100 * r["accuracy"],
            "time_s": r["time_s"],
        }
        | extras.get(r["epoch"], {})
        for r in history
    ]
