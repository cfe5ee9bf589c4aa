"""The Fashion-MNIST benchmark: train, follow OOD metrics per epoch, then compare the final
model, a plain cross-entropy control, UM and UMAP over several seeds.

Protocol (see ``docs/benchmarks.md``):

* ID data: Fashion-MNIST classes 0-5; 10% of their training images are held out as the
  validation split. Test near-OOD: the *test* images of classes 6-9. Test far-OOD: scikit-learn
  digits, grayscale photo crops and Gaussian / uniform noise generated with seed 0.
* Every choice (ξ recipe, learning rate) is made on validation data only: ID validation
  images against validation OOD sets that share no image with the test sets (training images of
  classes 6-9, photo crops and noise generated with seed 1).
* The control is the same fine-tune (epochs, learning rate, schedule, seed) without the
  constraint: plain cross-entropy. A gain the control also gets is not UM's gain.

Each (setting, seed) pair runs in its own process (:func:`run_seed`) and writes one JSON file;
:func:`summarize` aggregates them into ``results.json``, ``results.md`` and plots. Scores and
metrics are the library's (:meth:`OODUnleash.evaluate`), computed on the device the model
lives on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._files import write_atomic
from .constraint import DEFAULT_CONSTRAINT_FACTOR, estimate_loss_constraint, mean_cross_entropy
from .masking import select_layers
from .models import create_model
from .results import format_mean_std, mean_std, save_figure
from .scores import get_score
from .training import LossConstraintTooHighError
from .wrapper import METHOD_DEFAULTS, OODUnleash

__all__ = [
    "ALL_SCORES",
    "CONTROL_XI",
    "FineTune",
    "Setting",
    "TensorLoader",
    "default_grid",
    "evaluate_model",
    "in_batches",
    "load_benchmark_data",
    "load_checkpoint",
    "parse_finetune",
    "run_benchmark",
    "run_seed",
    "save_checkpoint",
    "select_configs",
    "subsample",
    "summarize",
    "tradeoff",
    "train_classifier",
    "xi_candidates",
    "xi_value",
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

#: The control runs through the same wrapper with a flooding level far below any batch loss:
#: ``|ce − 1e-12| + 1e-12`` equals ``ce`` and has its gradient, so this is plain cross-entropy
#: with everything else (optimizer, schedule, seed, masks for UMAP) identical.
CONTROL_XI = 1e-12


# ============================================================================ data
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
    from . import datasets as ds

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


# ============================================================================ scores
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


# ============================================================================ training
def train_classifier(
    model: nn.Module,
    loader: TensorLoader,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Standard recipe: SGD (momentum 0.9, Nesterov), cosine per step to zero, cross-entropy.

    ``on_epoch(epoch, record)`` is called after each epoch (1-based), e.g. to checkpoint.
    """
    device = torch.device(device)
    model.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        total = correct = seen = 0.0
        bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", leave=False, disable=not progress)
        for images, labels in bar:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(labels)
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
        record = {
            "epoch": epoch,
            "loss": total / seen,
            "accuracy": 100 * correct / seen,
            "time_s": time.perf_counter() - started,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return history


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model.state_dict()`` as safetensors (no pickle), atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, save(state))


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a safetensors state dict saved by :func:`save_checkpoint` into ``model``."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


# ============================================================================ ξ recipes
def _dense_ends(model: nn.Module) -> list[str]:
    """The first and last maskable layers (stem and head): left dense by some ξ recipes."""
    names = list(select_layers(model))
    return [names[0], names[-1]]


def xi_candidates(
    model: nn.Module, loader: TensorLoader, seed: int, device: torch.device
) -> dict[str, float]:
    """Every ξ recipe the sweep tries, from the trained model (left unchanged).

    * ``ref``: the paper's recipe, random mask keeping 96.5% of every conv/linear layer.
    * ``ref_avg3``: the same, averaged over three random draws.
    * ``dense_ends``: random 96.5% mask, stem and head left dense, three draws.
    * ``keep99``: random mask keeping 99% of every layer, three draws.
    * ``magnitude``: magnitude mask keeping 96.5% (prunes the smallest weights).
    * ``train_x2`` / ``x3`` / ``x4`` / ``x8``: multiples of the final training loss (eval mode).
    """
    est = dict(loader=loader, seed=seed, progress=False)
    train_loss = mean_cross_entropy(model, loader, device=device)
    out = {
        "ref": estimate_loss_constraint(model, keep_ratio=0.965, **est),
        "ref_avg3": estimate_loss_constraint(model, keep_ratio=0.965, draws=3, **est),
        "dense_ends": estimate_loss_constraint(
            model, keep_ratio=0.965, exclude=_dense_ends(model), draws=3, **est
        ),
        "keep99": estimate_loss_constraint(model, keep_ratio=0.99, draws=3, **est),
        "magnitude": estimate_loss_constraint(model, keep_ratio=0.965, init="magnitude", **est),
    }
    for k in (2, 3, 4, 8):
        out[f"train_x{k}"] = k * train_loss
    out["train_loss"] = train_loss
    return out


# ============================================================================ the sweep
#: UMAP's keep ratio in a grid name without ``/keep``: the reference's, which was the
#: library default when most results on the benchmark page were recorded. Names keep their
#: meaning when a library default changes, because every option is explicit in them.
REFERENCE_KEEP_RATIO = 0.8
#: The library's default UMAP mask options, as :class:`FineTune` fields.
UMAP_DEFAULT_MASK: dict[str, Any] = {
    key: METHOD_DEFAULTS["umap"][key] for key in ("keep_ratio", "mask_mode", "train_norms")
}
#: UMAP's layer choices in a grid name: every maskable layer, all but the first and last
#: ("/ends"), the last one only ("/head") or the first one only ("/stem").
MASKED_LAYERS = ("all", "ends", "head", "stem")


@dataclasses.dataclass(frozen=True)
class FineTune:
    """One fine-tune from the final checkpoint: ``xi`` names a ξ recipe, or ``"control"``."""

    method: str  # "um" or "umap"
    xi: str
    lr: float
    epochs: int = 10
    mask_init: str = "random"  # UMAP's initial scores
    keep_ratio: float | None = None  # UMAP's kept fraction (None: REFERENCE_KEEP_RATIO)
    masked: str = "all"  # UMAP's masked layers, one of MASKED_LAYERS
    mask_mode: str = "layer"  # UMAP: "layer" (each layer keeps keep_ratio) or "model"
    train_norms: bool = False  # UMAP: also train the normalisation layers' scale and shift

    def __post_init__(self) -> None:
        if self.masked not in MASKED_LAYERS:
            raise ValueError(f"masked must be one of {sorted(MASKED_LAYERS)}, got {self.masked!r}.")
        if self.mask_mode not in ("layer", "model"):
            raise ValueError(f"mask_mode must be 'layer' or 'model', got {self.mask_mode!r}.")
        for option, is_set in (
            (self.masked, self.masked != "all"),
            ("model", self.mask_mode == "model"),
            ("norms", self.train_norms),
        ):
            if is_set and self.method != "umap":
                raise ValueError(
                    f"'/{option}' is a UMAP option; {self.method!r} fine-tunes every "
                    f"weight. Drop '/{option}' or use method 'umap'."
                )

    def exclude(self, model: nn.Module) -> list[str] | None:
        """The layers of ``model`` this fine-tune leaves unmasked (``None``: none)."""
        if self.masked == "all":
            return None
        if self.masked == "ends":
            return _dense_ends(model)
        names = list(select_layers(model))
        return names[:-1] if self.masked == "head" else names[1:]

    @property
    def name(self) -> str:
        """A readable id, e.g. ``"um/train_x4/lr0.01/ep10"`` or
        ``"umap/train_x3/lr0.1/ep10/mag/keep0.9/ends"`` (see :func:`parse_finetune`)."""
        init = "/mag" if self.mask_init == "magnitude" else ""
        keep = "" if self.keep_ratio is None else f"/keep{self.keep_ratio:g}"
        layers = "" if self.masked == "all" else f"/{self.masked}"
        mode = "/model" if self.mask_mode == "model" else ""
        norms = "/norms" if self.train_norms else ""
        return (
            f"{self.method}/{self.xi}/lr{self.lr:g}/ep{self.epochs}"
            f"{init}{keep}{layers}{mode}{norms}"
        )

    @property
    def short_name(self) -> str:
        """:attr:`name` without the learning rate and epochs where they are the library's
        defaults for the method (:data:`~oodunleash.wrapper.METHOD_DEFAULTS`), for plot
        labels: ``"umap/train_x3/keep0.9"``."""
        defaults = METHOD_DEFAULTS[self.method]
        parts = self.name.split("/")
        drop = {f"lr{defaults['lr']:g}", f"ep{defaults['epochs']}"}
        return "/".join(parts[:2] + [p for p in parts[2:] if p not in drop])

    def control(self) -> FineTune:
        """The same fine-tune without the constraint (plain cross-entropy)."""
        return dataclasses.replace(self, xi="control")

    def fit(
        self, model: nn.Module, train: tuple[Tensor, Tensor], xi: float, seed: int
    ) -> OODUnleash:
        """Run this fine-tune on ``model`` (in place) as the benchmark does: ``train`` images
        and labels in shuffled batches of 128 (seeded by ``seed + 1``), the given ξ
        (:func:`xi_value`). Returns the fitted :class:`~oodunleash.OODUnleash`; UMAP's masks
        are still attached to ``model``."""
        unleashed = OODUnleash(
            model,
            self.method,
            exclude=self.exclude(model),
            mask_init=self.mask_init,
            keep_ratio=REFERENCE_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio,
            mask_mode=self.mask_mode,
            seed=seed,
        )
        return unleashed.fit(
            TensorLoader(*train, 128, shuffle=True, seed=seed + 1),
            epochs=self.epochs,
            lr=self.lr,
            loss_constraint=xi,
            train_norms=self.train_norms,
            progress=False,
        )


def parse_finetune(name: str) -> FineTune:
    """Inverse of :attr:`FineTune.name`, e.g. ``"umap/train_x3/lr0.1/ep10/keep0.9"``."""
    method, xi, lr, epochs, *options = name.split("/")
    init, keep, masked, mode, norms = "random", None, "all", "layer", False
    for option in options:
        if option == "mag":
            init = "magnitude"
        elif option == "norms":
            norms = True
        elif option == "model":
            mode = "model"
        elif option.startswith("keep"):
            keep = float(option.removeprefix("keep"))
        elif option in MASKED_LAYERS:
            masked = option
        else:
            raise ValueError(
                f"Unknown option {option!r} in fine-tune {name!r}: use 'mag' (magnitude-"
                "initialised UMAP scores), 'keep<ratio>' (UMAP keep ratio, e.g. keep0.9), "
                "'ends' (UMAP leaves the first and last layer dense), 'head' or 'stem' (UMAP "
                "masks only the last or only the first layer), 'model' (one UMAP threshold "
                "for the whole model, mask_mode='model'), 'norms' (UMAP also trains the "
                "normalisation layers' scale and shift)."
            )
    return FineTune(
        method,
        xi,
        float(lr.removeprefix("lr")),
        int(epochs.removeprefix("ep")),
        init,
        keep,
        masked,
        mode,
        norms,
    )


def xi_value(xis: dict[str, float], recipe: str) -> float | None:
    """The ξ a recipe gives: a stored value, ``train_x<k>`` for any multiple ``k`` of the
    stored training loss (e.g. ``train_x2.5``), :data:`CONTROL_XI` for ``"control"``; ``None``
    when ``xis`` has neither."""
    if recipe == "control":
        return CONTROL_XI
    if recipe in xis:
        return xis[recipe]
    factor = recipe.removeprefix("train_x")
    if factor != recipe and "train_loss" in xis:
        try:
            return float(factor) * xis["train_loss"]
        except ValueError:
            return None
    return None


def default_grid(quick: bool = False) -> list[FineTune]:
    """The fine-tunes the sweep runs for every setting and seed, most important first (a run
    with a deadline skips the tail of the list): the library's defaults and their controls,
    then the variants measured in ``docs/benchmarks.md``."""
    um, umap = "um", "umap"
    default_xi = f"train_x{DEFAULT_CONSTRAINT_FACTOR:g}"
    if quick:
        return [
            FineTune(um, "control", 0.01, 1),
            FineTune(um, default_xi, 0.01, 1),
            FineTune(umap, "control", 0.1, 1, **UMAP_DEFAULT_MASK),
            FineTune(umap, default_xi, 0.1, 1, **UMAP_DEFAULT_MASK),
        ]
    return [
        # the library defaults (ξ a multiple of the training loss; UMAP keeping 90% under one
        # threshold with trainable norms) and their controls
        FineTune(um, "control", 0.01),
        FineTune(um, default_xi, 0.01),
        *(FineTune(umap, xi, 0.1, **UMAP_DEFAULT_MASK) for xi in ("control", default_xi)),
        # the reference's UMAP: keep 80% of each layer, norms frozen
        FineTune(umap, "control", 0.1),
        FineTune(umap, default_xi, 0.1),
        # UMAP keeping 90% of each layer
        FineTune(umap, "control", 0.1, keep_ratio=0.9),
        FineTune(umap, default_xi, 0.1, keep_ratio=0.9),
        FineTune(umap, "train_x2.5", 0.1, keep_ratio=0.9),
        # other multiples of the training loss
        FineTune(um, "train_x2", 0.01),
        FineTune(um, "train_x4", 0.01),
        FineTune(umap, "train_x2", 0.1),
        FineTune(umap, "train_x4", 0.1),
        # the paper's recipe: a random mask keeping 96.5% of every layer
        FineTune(um, "ref", 0.01),
        FineTune(umap, "ref", 0.1),
        # UMAP starting from a magnitude mask instead of a random one
        FineTune(umap, "control", 0.1, mask_init="magnitude"),
        FineTune(umap, default_xi, 0.1, mask_init="magnitude"),
        # a higher fine-tune learning rate
        FineTune(um, "control", 0.05),
        FineTune(um, default_xi, 0.05),
        # the other masked-model ξ recipes
        FineTune(um, "dense_ends", 0.01),
        FineTune(umap, "dense_ends", 0.1),
        FineTune(um, "keep99", 0.01),
        FineTune(um, "magnitude", 0.01),
        FineTune(um, "train_x8", 0.01),
    ]


@dataclasses.dataclass(frozen=True)
class Setting:
    """A model and how it is trained: ``"small_cnn"``, ``"resnet18"``, with optional
    ``:noise=0.2`` (symmetric label noise on the training labels) and ``:epochs=N``."""

    model: str
    epochs: int
    label_noise: float = 0.0
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Setting:
        """Read ``"model[:noise=R][:epochs=N]"``; ResNet-18 trains 20 epochs, others 25."""
        model, *opts = spec.split(":")
        kwargs: dict[str, Any] = {"epochs": {"resnet18": 20}.get(model, 25)}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "noise":
                kwargs["label_noise"] = float(value)
            elif key == "epochs":
                kwargs["epochs"] = int(value)
            else:
                raise ValueError(f"Unknown option {key!r} in setting {spec!r}.")
        return cls(model=model, spec=spec, **kwargs)


def _noisy(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    if rate <= 0:
        return labels
    g = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(len(labels), generator=g) < rate
    # Symmetric noise to one of the *other* classes.
    shift = torch.randint(1, num_classes, (len(labels),), generator=g)
    return torch.where(flip, (labels + shift) % num_classes, labels)


def run_seed(
    setting: str,
    seed: int,
    out_dir: str | os.PathLike[str],
    *,
    data: dict[str, Any] | None = None,
    dataset: str = "fashion-mnist",
    train_size: int | None = None,
    eval_cap: int | None = None,
    grid: Sequence[FineTune] | None = None,
    device: str = "cpu",
    scores: Sequence[str] = ALL_SCORES,
    fit_size: int = 10000,
    checkpoints: str = "all",
    deadline: float | None = None,
    curve: bool = True,
    resume: bool = False,
    progress: bool = True,
    report: bool = False,
) -> dict[str, Any]:
    """Run one (setting, seed): training with per-epoch OOD metrics, ξ recipes, the fine-tune
    grid. ``<out_dir>/seeds/<setting>_s<seed>.json`` is rewritten after every fine-tune, so an
    interrupted run keeps what it finished; fine-tunes that would start after ``deadline``
    (a ``time.time()`` value) are skipped. With ``resume``, an earlier run's JSON and final
    checkpoint (``checkpoints="all"`` or ``"final"``) replace training, and only the fine-tunes
    that JSON lacks are run. ``report`` prints a line per finished stage (for parallel runs,
    where progress bars from several processes would interleave). Returns the JSON content."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    out = pathlib.Path(out_dir)
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    cfg = Setting.parse(setting)
    grid = list(default_grid() if grid is None else grid)
    if data is None:
        data = load_benchmark_data(dataset, train_size=train_size, eval_cap=eval_cap)
    k = data["num_classes"]
    train_x = data["train"][0].to(dev)
    train_y = _noisy(data["train"][1], cfg.label_noise, k, seed).to(dev)
    fit_set = subsample(data["train"][0], data["train"][1], fit_size, seed)  # clean labels
    tag = f"{setting.replace(':', '_').replace('=', '')}_s{seed}"
    json_path = out / "seeds" / f"{tag}.json"
    ckpt_dir = out / "checkpoints" / tag

    def say(message: str) -> None:
        if report:
            print(f"{setting} s{seed}: {message}", flush=True)

    if checkpoints != "none":
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    def evaluate(model: nn.Module, which: str, score_names: Sequence[str]) -> dict[str, Any]:
        id_key, ood_key = ("val", "val_ood") if which == "val" else ("test", "test_ood")
        return evaluate_model(
            model,
            data[id_key],
            data[ood_key],
            score_names,
            fit_set=fit_set,
            num_classes=k,
            device=dev,
        )

    model = create_model(cfg.model, k).to(dev)
    if resume:
        result, final_state = _resume(json_path, _checkpoint_path(ckpt_dir, cfg.epochs), model)
        # Fine-tuning on other data than the model was trained on would measure nothing.
        if result["dataset"] != data["dataset"]:
            raise ValueError(
                f"Cannot resume {json_path}: it was trained on {result['dataset']!r}, this run "
                f"loads {data['dataset']!r}. Pass the earlier run's --dataset."
            )
        if result["train_size"] != len(train_y):
            raise ValueError(
                f"Cannot resume {json_path}: it was trained on {result['train_size']} images, "
                f"this run loads {len(train_y)}. Pass the earlier run's --train-size."
            )
    else:
        # ---- 1. train to the end, OOD metrics per epoch
        loader = TensorLoader(train_x, train_y, 128, shuffle=True, seed=seed)
        with_curve, curve = curve, []

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            if checkpoints == "all" or (checkpoints == "final" and epoch == cfg.epochs):
                save_checkpoint(model, _checkpoint_path(ckpt_dir, epoch))
            if not with_curve:
                curve.append(record)
                return
            curve.append(
                record
                | {
                    "test": evaluate(model, "test", ("energy", "msp")),
                    "val": evaluate(model, "val", ("energy", "msp")),
                }
            )

        started = time.perf_counter()
        train_classifier(
            model,
            loader,
            epochs=cfg.epochs,
            device=dev,
            on_epoch=on_epoch,
            progress=progress,
            desc=f"{setting} s{seed}",
        )
        train_time = time.perf_counter() - started
        say(f"trained {cfg.epochs} epochs in {train_time:.0f} s")
        final_state = copy.deepcopy(model.state_dict())

        # ---- 2. ξ recipes from the final model (on the training data it was trained on)
        xis = xi_candidates(model, TensorLoader(train_x, train_y, 1024, shuffle=False), seed, dev)
        result: dict[str, Any] = {
            "setting": setting,
            "model": cfg.model,
            "label_noise": cfg.label_noise,
            "epochs": cfg.epochs,
            "seed": seed,
            "dataset": data["dataset"],
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "train_size": len(train_y),
            "train_time_s": train_time,
            "curve": curve,
            "xi": xis,
            "skipped": [],
            "runs": {
                "final": {
                    "val": evaluate(model, "val", scores),
                    "test": evaluate(model, "test", scores),
                }
            },
        }
        write_atomic(json_path, json.dumps(result))

    # ---- 3. fine-tunes from the final checkpoint (those an earlier run lacks, on resume)
    # A resumed run keeps the scores it was started with.
    run_scores = list(result["runs"]["final"]["test"]["metrics"])
    xis = result["xi"]
    longest = 0.0
    todo = [ft for ft in grid if ft.name not in result["runs"] | result.get("refused", {})]
    unknown = sorted({ft.xi for ft in todo if xi_value(xis, ft.xi) is None})
    if unknown:
        raise ValueError(
            f"No ξ recipe {unknown} in {json_path} (it has {sorted(xis)}): that run predates "
            "them. Use one of those (or train_x<k> for any multiple k of its train_loss), or "
            "start a fresh run in another --out."
        )
    desc = f"{result['setting']} s{seed} fine-tunes"

    def save() -> None:
        write_atomic(json_path, json.dumps(result))

    for ft in tqdm(todo, desc=desc, disable=not progress):
        if deadline is not None and time.time() + longest > deadline:
            result["skipped"].append(ft.name)
            save()
            say(f"skipped {ft.name} (time budget)")
            continue
        model.load_state_dict(final_state)
        xi = xi_value(xis, ft.xi)
        t0 = time.perf_counter()
        try:
            unleashed = ft.fit(model, (train_x, train_y), xi, seed)
        except LossConstraintTooHighError as err:
            # Refused before any step (a ξ recipe too high for this model): the rest of the
            # grid still runs, and the refusal is part of the results.
            result.setdefault("refused", {})[ft.name] = str(err)
            save()
            say(f"refused {ft.name}: ξ = {xi:.4g} is not below ln({k})")
            continue
        fitted = unleashed.export()
        if unleashed.masks_ is not None:
            unleashed.masks_.detach()
        result["runs"][ft.name] = {
            "config": dataclasses.asdict(ft),
            "xi_value": xi,
            "time_s": time.perf_counter() - t0,
            "history": unleashed.history_,
            "val": evaluate(fitted, "val", run_scores),
            "test": evaluate(fitted, "test", run_scores),
        }
        longest = max(longest, time.perf_counter() - t0)
        if report:
            run = result["runs"][ft.name]
            score = "energy" if "energy" in run_scores else run_scores[0]
            say(
                f"{ft.name} in {run['time_s']:.0f} s: test accuracy "
                f"{run['test']['accuracy']:.2f}, mean {score} FPR95 "
                f"{_mean_fpr(run['test'], score):.1f} (final model "
                f"{_mean_fpr(result['runs']['final']['test'], score):.1f})"
            )
        # A fine-tune an earlier, deadline-cut run skipped is no longer missing.
        result["skipped"] = [n for n in result["skipped"] if n not in result["runs"]]
        save()
    return result


def _checkpoint_path(ckpt_dir: pathlib.Path, epoch: int) -> pathlib.Path:
    """Where training saves the checkpoint of ``epoch``, and where ``--resume`` reads it."""
    return ckpt_dir / f"epoch{epoch:03d}.safetensors"


def _resume(
    json_path: pathlib.Path, final_ckpt: pathlib.Path, model: nn.Module
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An earlier run's results and its final model, loaded into ``model``."""
    missing = [str(p) for p in (json_path, final_ckpt) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Cannot resume: {', '.join(missing)} not found. Resuming needs the earlier run's "
            "JSON and its final checkpoint (run it with --checkpoints final or all)."
        )
    result = json.loads(json_path.read_text())
    load_checkpoint(model, final_ckpt)
    return result, copy.deepcopy(model.state_dict())


def _worker(args: tuple) -> str:
    setting, seed, out_dir, kwargs = args
    torch.set_num_threads(kwargs.pop("threads", 1))
    run_seed(setting, seed, out_dir, **kwargs)
    return f"{setting} s{seed}"


def run_benchmark(
    settings: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    jobs: int = 1,
    quick: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every (setting, seed), ``jobs`` at a time in separate processes (one process
    when ``jobs == 1``), then :func:`summarize`. Extra keyword arguments go to
    :func:`run_seed`."""
    started = time.perf_counter()
    kwargs.setdefault("grid", default_grid(quick))
    for name in kwargs.get("scores", ()):
        get_score(name)  # an unknown name fails here, not after hours of training

    tasks = [(s, seed, str(out_dir), dict(kwargs)) for s in settings for seed in seeds]
    if jobs <= 1:
        for setting, seed, out, kw in tasks:
            run_seed(setting, seed, out, **kw)
    else:
        for task in tasks:
            task[3]["progress"] = False
            task[3]["report"] = True
        for done in _in_processes(_worker, tasks, jobs):
            print(f"done: {done}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return summarize(out_dir, wall_time_s=time.perf_counter() - started)


def _in_processes(func: Callable[[Any], Any], tasks: Sequence[Any], jobs: int) -> Iterator[Any]:
    """Yield ``func(task)`` for every task as ``jobs`` spawned processes finish them.

    The workers stop with this process: on an exception, Ctrl-C, or a SIGTERM (the signal a
    scheduler or ``kill`` sends), which is turned into ``SystemExit`` so that the pool is
    terminated instead of left running. Whatever a worker saved before stays, since results
    and checkpoints are written atomically.
    """
    import multiprocessing as mp
    import signal
    import threading

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
        previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:  # spawn: CUDA cannot be forked
            yield from pool.imap_unordered(func, tasks)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ============================================================================ summary
def _mean_fpr(block: dict[str, Any], score: str = "energy") -> float:
    sets = block["metrics"][score]
    return float(np.mean([m["fpr95"] for m in sets.values()]))


def _mean_auroc(block: dict[str, Any], score: str = "energy") -> float:
    sets = block["metrics"][score]
    return float(np.mean([m["auroc"] for m in sets.values()]))


def _common_runs(rs: list[dict[str, Any]]) -> list[str]:
    """Runs every seed finished (a deadline may have cut some seeds short)."""
    return [n for n in rs[0]["runs"] if all(n in r["runs"] for r in rs)]


def _paired(
    rs: list[dict[str, Any]], name: str, split: str
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """The seeds that finished run ``name``, its ``split`` results and their final model's."""
    have = [r for r in rs if name in r["runs"]]
    return (
        [r["seed"] for r in have],
        [r["runs"][name][split] for r in have],
        [r["runs"]["final"][split] for r in have],
    )


def _accuracy_change(
    runs: list[dict[str, Any]], finals: list[dict[str, Any]]
) -> tuple[float, float]:
    """Mean ± std over seeds of each run's accuracy minus its own seed's final model's."""
    return mean_std([a["accuracy"] - f["accuracy"] for a, f in zip(runs, finals, strict=True)])


def tradeoff(rs: list[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """Each fine-tune's ID accuracy change (points) and relative change of the mean Energy
    FPR95 (%), against the final model of the same seed, as ``(mean, std)`` over the seeds
    that finished it. The issue's target is accuracy change ≥ −1 and FPR95 change ≤ −25%."""
    names = dict.fromkeys(n for r in rs for n in r["runs"] if n != "final")
    points = []
    for name in names:
        seeds, runs, finals = _paired(rs, name, split)
        fpr_changes = [
            100 * (_mean_fpr(a) / _mean_fpr(f) - 1) for a, f in zip(runs, finals, strict=True)
        ]
        points.append(
            {
                "name": name,
                "seeds": seeds,
                "accuracy_change": _accuracy_change(runs, finals),
                "fpr95_change_pct": mean_std(fpr_changes),
            }
        )
    return points


def _partial_runs(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs only some seeds finished (a deadline, or resumes with different grids), each
    compared with the final model *of the same seeds*, so that no seed's luck is compared
    with another's."""
    common = set(_common_runs(rs))
    names = [n for r in rs for n in r["runs"] if n not in common]
    rows = []
    for name in dict.fromkeys(names):
        row: dict[str, Any] = {"name": name}
        for split in ("val", "test"):
            row["seeds"], runs, finals = _paired(rs, name, split)
            row[split] = {
                "accuracy_change": _accuracy_change(runs, finals),
                "mean_auroc": mean_std([_mean_auroc(b) for b in runs]),
                "mean_fpr95": mean_std([_mean_fpr(b) for b in runs]),
                "final_mean_fpr95": mean_std([_mean_fpr(b) for b in finals]),
            }
        rows.append(row)
    return rows


def select_configs(per_seed: list[dict[str, Any]], max_acc_drop: float = 1.0) -> dict[str, str]:
    """Validation-only choice per method: the fine-tune with the lowest mean (over seeds and
    validation OOD sets) Energy FPR95 whose mean validation accuracy is within
    ``max_acc_drop`` points of the final model's (if none is, the one with the highest
    validation accuracy). Returns ``{"um": name, "umap": name, ...}`` plus the matching
    controls (the same fine-tune with ``xi="control"``)."""
    names = [n for n in _common_runs(per_seed) if n != "final"]
    base_acc = np.mean([r["runs"]["final"]["val"]["accuracy"] for r in per_seed])
    chosen: dict[str, str] = {}
    for method in ("um", "umap"):
        best, best_fpr, best_acc, most_acc = None, math.inf, None, -math.inf
        for n in names:
            cfg = per_seed[0]["runs"][n]["config"]
            if cfg["method"] != method or cfg["xi"] == "control":
                continue
            acc = np.mean([r["runs"][n]["val"]["accuracy"] for r in per_seed])
            fpr = np.mean([_mean_fpr(r["runs"][n]["val"]) for r in per_seed])
            if acc >= base_acc - max_acc_drop and fpr < best_fpr:
                best, best_fpr = n, fpr
            if acc > most_acc:
                best_acc, most_acc = n, acc
        best = best or best_acc
        if best is None:
            continue
        chosen[method] = best
        control = parse_finetune(best).control().name
        # Only a control every seed finished: one a time budget skipped on some seeds would
        # be compared over other seeds than the fine-tune (it is listed as a partial run).
        if control in names:
            chosen[f"{method}_control"] = control
    return chosen


def summarize(out_dir: str | os.PathLike[str], wall_time_s: float | None = None) -> dict[str, Any]:
    """Aggregate ``<out_dir>/seeds/*.json`` into ``results.json``, ``results.md`` and plots."""
    out = pathlib.Path(out_dir)
    files = sorted((out / "seeds").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No per-seed results under {out / 'seeds'}.")
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        r = json.loads(f.read_text())
        by_setting.setdefault(r["setting"], []).append(r)
    summary: dict[str, Any] = {"wall_time_s": wall_time_s, "settings": {}}
    md = ["# Benchmark results", ""]
    if wall_time_s is not None:
        md += [f"Wall time: {wall_time_s / 60:.1f} min.", ""]
    for setting, rs in by_setting.items():
        rs.sort(key=lambda r: r["seed"])
        chosen = select_configs(rs)
        s_sum = _summarize_setting(rs, chosen)
        summary["settings"][setting] = s_sum
        md += _setting_markdown(setting, rs, chosen, s_sum)
        _plot_setting(out, setting, rs, chosen)
    write_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_atomic(out / "results.md", "\n".join(md) + "\n")
    return summary


def _rows(rs: list[dict[str, Any]], chosen: dict[str, str]) -> list[tuple[str, str]]:
    rows = [("final model", "final")]
    labels = {
        "um_control": "control (plain CE, UM recipe)",
        "um": "UM",
        "umap_control": "control (plain CE, UMAP recipe)",
        "umap": "UMAP",
    }
    rows += [(f"{labels[k]}: {chosen[k]}", chosen[k]) for k in labels if k in chosen]
    paper = FineTune("um", "ref", 0.01).name
    if paper in _common_runs(rs) and paper not in chosen.values():
        rows.append((f"UM, the paper's ξ recipe ({paper})", paper))
    return rows


def _summarize_setting(rs: list[dict[str, Any]], chosen: dict[str, str]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name in _common_runs(rs):
        entry: dict[str, Any] = {}
        for split in ("val", "test"):
            blocks = [r["runs"][name][split] for r in rs]
            scores = blocks[0]["metrics"]
            entry[split] = {
                "accuracy": mean_std([b["accuracy"] for b in blocks]),
                "metrics": {
                    s: {
                        ood: {
                            m: mean_std([b["metrics"][s][ood][m] for b in blocks])
                            for m in scores[s][ood]
                        }
                        for ood in scores[s]
                    }
                    for s in scores
                },
                "mean_fpr95": {s: mean_std([_mean_fpr(b, s) for b in blocks]) for s in scores},
                "mean_auroc": {s: mean_std([_mean_auroc(b, s) for b in blocks]) for s in scores},
            }
        runs[name] = entry
    xis = {k: mean_std([r["xi"][k] for r in rs]) for k in rs[0]["xi"]}
    return {
        "seeds": [r["seed"] for r in rs],
        "chosen": chosen,
        "xi": xis,
        "runs": runs,
        "partial_runs": _partial_runs(rs),
    }


def _setting_markdown(
    setting: str, rs: list[dict[str, Any]], chosen: dict[str, str], s_sum: dict[str, Any]
) -> list[str]:
    seeds = ", ".join(str(r["seed"]) for r in rs)
    # Seeds run on different machines can be summarised together (the same protocol).
    devices = ", ".join(dict.fromkeys(r["device"] for r in rs))
    r0 = rs[0]
    md = [
        f"## {setting} ({r0['dataset']}, {r0['epochs']} epochs, label noise "
        f"{r0['label_noise']:g}, seeds {seeds}, device {devices})",
        "",
        "ξ recipes (mean ± std over seeds): "
        + ", ".join(f"{k} {format_mean_std([r['xi'][k] for r in rs], 4)}" for k in r0["xi"]),
        "",
    ]
    refused: dict[str, list[str]] = {}
    for r in rs:
        for name in r.get("refused", {}):
            refused.setdefault(name, []).append(str(r["seed"]))
    if refused:
        md += [
            "Refused before any step (ξ at or above the loss of a uniform guess): "
            + ", ".join(f"{n} (seeds {', '.join(s)})" for n, s in refused.items()),
            "",
        ]
    md += ["### Test: Energy, per OOD set (AUROC / FPR95), mean over seeds", ""]
    oods = list(r0["runs"]["final"]["test"]["metrics"]["energy"])
    md.append("| model | ID acc | " + " | ".join(oods) + " | mean AUROC | mean FPR95 |")
    md.append("|---" * (len(oods) + 4) + "|")
    for label, name in _rows(rs, chosen):
        blocks = [r["runs"][name]["test"] for r in rs]
        cells = []
        for ood in oods:
            a = np.mean([b["metrics"]["energy"][ood]["auroc"] for b in blocks])
            f = np.mean([b["metrics"]["energy"][ood]["fpr95"] for b in blocks])
            cells.append(f"{a:.1f} / {f:.1f}")
        md.append(
            f"| {label} | {format_mean_std([b['accuracy'] for b in blocks], 2)} | "
            + " | ".join(cells)
            + f" | {format_mean_std([_mean_auroc(b) for b in blocks])} | {format_mean_std([_mean_fpr(b) for b in blocks])} |"
        )
    scores = list(r0["runs"]["final"]["test"]["metrics"])
    md += [
        "",
        "### Test: every score, mean over OOD sets (AUROC / FPR95), mean ± std over seeds",
        "",
        "| model | " + " | ".join(scores) + " |",
        "|---" * (len(scores) + 1) + "|",
    ]
    for label, name in _rows(rs, chosen):
        blocks = [r["runs"][name]["test"] for r in rs]
        cells = [
            f"{format_mean_std([_mean_auroc(b, s) for b in blocks])} / {format_mean_std([_mean_fpr(b, s) for b in blocks])}"
            for s in scores
        ]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    md += [
        "",
        "### Validation sweep (the only numbers choices were made on): Energy, mean over "
        "validation OOD sets",
        "",
        "| fine-tune | ξ (mean) | val ID acc | val mean AUROC | val mean FPR95 | "
        "final train-mode CE |",
        "|---|---|---|---|---|---|",
    ]
    for name in _common_runs(rs):
        blocks = [r["runs"][name]["val"] for r in rs]
        xi = "-" if name == "final" else f"{np.mean([r['runs'][name]['xi_value'] for r in rs]):.4f}"
        ce = (
            "-"
            if name == "final"
            else f"{np.mean([r['runs'][name]['history'][-1]['ce'] for r in rs]):.4f}"
        )
        mark = ""
        if name in (chosen.get("um"), chosen.get("umap")):
            mark = " **(chosen)**"
        elif name in chosen.values():
            mark = " (its control)"
        md.append(
            f"| {name}{mark} | {xi} | {format_mean_std([b['accuracy'] for b in blocks], 2)} | "
            f"{format_mean_std([_mean_auroc(b) for b in blocks])} | {format_mean_std([_mean_fpr(b) for b in blocks])} | {ce} |"
        )
    md.append("")
    if s_sum["partial_runs"]:
        md += [
            "### Fine-tunes only some seeds finished: Energy, each against the final model of "
            "the same seeds",
            "",
            "| fine-tune | seeds | val acc change | val mean FPR95 (final → run) | "
            "test acc change | test mean AUROC | test mean FPR95 (final → run) |",
            "|---|---|---|---|---|---|---|",
        ]

        def ms(pair: tuple[float, float], digits: int = 1) -> str:
            return f"{pair[0]:+.{digits}f} ± {pair[1]:.{digits}f}"

        for row in s_sum["partial_runs"]:
            val, test = row["val"], row["test"]
            md.append(
                f"| {row['name']} | {', '.join(map(str, row['seeds']))} | "
                f"{ms(val['accuracy_change'], 2)} | {val['final_mean_fpr95'][0]:.1f} → "
                f"{val['mean_fpr95'][0]:.1f} | {ms(test['accuracy_change'], 2)} | "
                f"{test['mean_auroc'][0]:.1f} | {test['final_mean_fpr95'][0]:.1f} → "
                f"{test['mean_fpr95'][0]:.1f} ± {test['mean_fpr95'][1]:.1f} |"
            )
        md.append("")
    return md


def _plot_setting(
    out: pathlib.Path, setting: str, rs: list[dict[str, Any]], chosen: dict[str, str]
) -> None:
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
    rows = _rows(rs, chosen)
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
        cfg = parse_finetune(p["name"])
        labels.append(f"{cfg.short_name} (n={len(p['seeds'])})")
        (x, dx), (y, dy) = p["accuracy_change"], p["fpr95_change_pct"]
        control = cfg.xi == "control"
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
