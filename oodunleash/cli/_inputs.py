"""What every command reads from its flags: the device, the model and its preprocessing, the
labelled and unlabelled image sets."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from oodunleash.cli import _data, _preprocessing
from oodunleash.cli._errors import UsageError
from oodunleash.cli._models import ResolvedModel, resolve_model
from oodunleash.scores import OODScore, resolve_score

__all__ = ["check_score", "device", "labelled_loader", "load_model", "ood_loaders", "progress"]


def device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other torch device as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this PyTorch sees no CUDA device; use --device cpu.")
    return name


def check_score(name: str, flag: str) -> OODScore:
    """A new instance of the registered score ``name`` (or label, ``"knn k=1"``); an unknown
    name is a usage error."""
    try:
        return resolve_score(name)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{flag} {name}: {exc}") from None


def progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars."""
    return not args.no_progress


def load_model(
    args: argparse.Namespace, num_classes: int | None = None, *, announce: bool = True
) -> tuple[ResolvedModel, dict[str, Any], Callable]:
    """MODEL on ``--device``, its timm data config with the flags' overrides, and the
    transform. ``announce`` prints the preprocessing on stdout (``score``, whose stdout may be
    a CSV, prints :func:`preprocessing_line` on stderr once done, so a failure stays one line
    there)."""
    resolved = resolve_model(
        args.model,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes if args.num_classes is not None else num_classes,
    )
    resolved.model.to(device(args.device))
    config = _data.preprocessing(
        resolved.model,
        img_size=args.img_size,
        mean=args.mean,
        std=args.std,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
    )
    if announce:
        print(preprocessing_line(resolved, config, args))
    return resolved, config, _data.image_transform(config)


def preprocessing_line(
    resolved: ResolvedModel, config: dict[str, Any], args: argparse.Namespace
) -> str:
    """What the images go through, and where those settings came from."""
    return _preprocessing.describe(config, _preprocessing_source(resolved, args))


def _preprocessing_source(resolved: ResolvedModel, args: argparse.Namespace) -> str:
    """Where the preprocessing came from, for the line the commands print."""
    recorded = resolved.unleashed is not None and resolved.unleashed.preprocessing
    base = "recorded in the checkpoint" if recorded else "timm's defaults for the architecture"
    flags = [
        f"--{name.replace('_', '-')}"
        for name in ("img_size", "mean", "std", "crop_pct", "interpolation")
        if getattr(args, name) is not None
    ]
    return base + (f", overridden by {' '.join(flags)}" if flags else "")


def labelled_loader(
    dataset: Any, transform: Callable, args: argparse.Namespace, *, shuffle: bool = False
) -> DataLoader:
    """A loader over an ``ImageFolder`` made by :func:`_data.labelled_folder`."""
    dataset.transform = transform
    return _data.loader(dataset, args.batch_size, args.workers, shuffle=shuffle)


def ood_loaders(
    named: list[tuple[str, str]] | None, transform: Callable, args: argparse.Namespace
) -> dict[str, DataLoader]:
    """``--ood-dir NAME=DIR`` flags -> ``{NAME: loader}`` over every image under DIR."""
    loaders: dict[str, DataLoader] = {}
    for name, folder in named or []:
        if name in loaders:
            raise UsageError(f"--ood-dir {name}=...: the name {name!r} is given twice.")
        images = _data.loose_images([folder], transform, "--ood-dir")
        loaders[name] = _data.loader(images, args.batch_size, args.workers)
    return loaders
