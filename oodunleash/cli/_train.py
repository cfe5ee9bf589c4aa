"""``oodunleash fit`` and ``oodunleash tune``: fine-tune a classifier on an image folder, save it
with the preprocessing it was trained with."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from oodunleash.cli import _data, _inputs, _preprocessing
from oodunleash.cli._errors import UsageError
from oodunleash.cli._models import ResolvedModel
from oodunleash.runtime.files import write_atomic
from oodunleash.wrapper import OODUnleash

__all__ = ["cmd_fit", "cmd_tune", "save_checkpoint"]


def save_checkpoint(
    unleashed: OODUnleash,
    out: str | Path,
    *,
    class_names: list[str],
    preprocessing: Mapping[str, Any],
) -> Path:
    """``save_pretrained`` to ``out``, recording ``preprocessing`` where timm's
    ``resolve_data_config`` reads it back from the reloaded model.

    Passes ``input_size``/``mean``/``std``/``interpolation``/``crop_pct`` to ``save_pretrained``
    when it takes them; older versions copy the model's timm ``pretrained_cfg`` into the
    checkpoint, so the values are set there first.
    """
    recorded = {k: preprocessing[k] for k in _data.RECORDED_KEYS if k in preprocessing}
    accepted = inspect.signature(unleashed.save_pretrained).parameters
    if set(recorded) <= set(accepted) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()
    ):
        return unleashed.save_pretrained(out, class_names=class_names, **recorded)
    cfg = getattr(unleashed.model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        unleashed.model.pretrained_cfg = {**cfg, **recorded}
    return unleashed.save_pretrained(out, class_names=class_names)


def _accuracy(
    unleashed: OODUnleash,
    loader: Iterable,
    progress: bool,
    desc: str,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy of the wrapped model (UMAP masks applied) on a labelled loader."""
    from oodunleash.evaluation.metrics import accuracy
    from oodunleash.features import collect_features

    model = unleashed.model
    was_training = model.training
    model.eval()
    try:
        data = collect_features(
            unleashed.feature_extractor,
            loader,
            keep=("logits", "labels"),
            need_labels=True,
            progress=progress,
            desc=desc,
            max_batches=max_batches,
        )
    finally:
        model.train(was_training)
    return accuracy(data.logits, data.labels)


def _training_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--train-dir`` and ``--val-dir`` ImageFolders, with the same classes."""
    train = _data.labelled_folder(args.train_dir, "--train-dir")
    val = _data.labelled_folder(args.val_dir, "--val-dir") if args.val_dir else None
    if val is not None and val.classes != train.classes:
        raise UsageError(
            f"--val-dir {args.val_dir} has the classes {val.classes}, --train-dir has "
            f"{train.classes}: they must match (same sub-folder names)."
        )
    return train, val


def _check_classes(resolved: ResolvedModel, classes: list[str], flag: str) -> None:
    head = getattr(resolved.model, "num_classes", None)
    if isinstance(head, int) and head != len(classes):
        raise UsageError(
            f"MODEL {resolved.source} has {head} classes but {flag} has {len(classes)} "
            f"({', '.join(classes)})."
        )


def _summary(unleashed: OODUnleash, seconds: float) -> str:
    last = unleashed.history_[-1]
    xi = unleashed.loss_constraint_
    return (
        f"{unleashed.method.upper()}: ξ={'none' if xi is None else f'{xi:.4g}'}, last epoch CE "
        f"{last['ce']:.4f}, train accuracy {100 * last['accuracy']:.2f}%, {seconds:.1f}s"
    )


def _has_weights(resolved: ResolvedModel, args: argparse.Namespace) -> bool:
    """Whether MODEL came with trained weights (a random timm model is at chance anyway)."""
    return bool(args.checkpoint) or resolved.unleashed is not None or "hf-hub:" in resolved.source


def _check_recognised(
    unleashed: OODUnleash, loader: Iterable, classes: int, config: Mapping[str, Any], show: bool
) -> None:
    """Warn when trained weights score near chance on their own training images: the usual
    cause is a preprocessing unlike training's. A few shuffled batches are enough to tell."""
    accuracy = _accuracy(unleashed, loader, show, "train accuracy", max_batches=8)
    if _preprocessing.near_chance(accuracy, classes):
        print(
            f"warning: the model's accuracy on --train-dir is {100 * accuracy:.1f}%, near chance "
            f"({100 / classes:.1f}% for {classes} classes). {_preprocessing.mismatch_hint(config)}",
            file=sys.stderr,
        )


def _fit(unleashed: OODUnleash, loader: Iterable, args: argparse.Namespace, config: Any) -> None:
    from oodunleash.finetune.losses import LossConstraintTooHighError

    try:
        unleashed.fit(
            loader,
            epochs=args.epochs,
            lr=args.lr,
            device=_inputs.device(args.device),
            progress=_inputs.progress(args),
            training={"amp": args.amp},
        )
    except LossConstraintTooHighError as exc:  # a runtime failure still (exit code 1)
        raise LossConstraintTooHighError(f"{exc} {_preprocessing.mismatch_hint(config)}") from None


def cmd_fit(args: argparse.Namespace) -> int:
    """Fine-tune MODEL with UM or UMAP on ``--train-dir``."""
    train, val = _training_data(args)
    resolved, config, transform = _inputs.load_model(args, num_classes=len(train.classes))
    _check_classes(resolved, train.classes, "--train-dir")
    show = _inputs.progress(args)
    train_loader = _inputs.labelled_loader(train, transform, args, shuffle=True)
    val_loader = _inputs.labelled_loader(val, transform, args) if val is not None else None
    _inputs.check_score(args.score, "--score")
    try:
        unleashed = OODUnleash(
            resolved.model,
            args.method,
            keep_ratio=args.keep_ratio,
            seed=args.seed,
            score=args.score,
            **({} if args.loss_constraint is None else {"constraint": args.loss_constraint}),
        )
    except ValueError as exc:  # a flag out of range, e.g. --keep-ratio
        raise UsageError(str(exc)) from None
    if _has_weights(resolved, args):
        _check_recognised(unleashed, train_loader, len(train.classes), config, show)
    before = _accuracy(unleashed, val_loader, show, "val before") if val_loader else None
    start = time.perf_counter()
    _fit(unleashed, train_loader, args, config)
    print(_summary(unleashed, time.perf_counter() - start))
    if val_loader is not None:
        after = _accuracy(unleashed, val_loader, show, "val after")
        print(f"Validation accuracy: {100 * before:.2f}% -> {100 * after:.2f}%")
    folder = save_checkpoint(unleashed, args.out, class_names=train.classes, preprocessing=config)
    print(f"Saved: {folder}")
    return 0


def _tune_function() -> Callable[..., Any]:
    import oodunleash

    tune = getattr(oodunleash, "tune", None)
    if inspect.ismodule(tune):  # the module, when the package does not re-export the function
        tune = getattr(tune, "tune", None)
    if not callable(tune):
        raise UsageError(
            "This version of oodunleash has no tune(): upgrade oodunleash, or use "
            "`oodunleash fit` with chosen settings."
        )
    return tune


def _save_best(result: Any, args: argparse.Namespace, classes: list[str], config: dict) -> None:
    from oodunleash.wrapper import NotFittedError

    try:
        folder = save_checkpoint(result.best, args.out, class_names=classes, preprocessing=config)
    except NotFittedError:
        # The unchanged model won and this version saves fitted wrappers only.
        print(
            f"Nothing saved: the unchanged model won ({result.best_name}); keep using MODEL as it "
            f"is, with `--score '{result.best_score}'`."
        )
        return
    print(f"Saved: {folder}")


def cmd_tune(args: argparse.Namespace) -> int:
    """Search fine-tune settings on ``--train-dir``, pick by ``--val-dir`` (and OOD sets)."""
    tune = _tune_function()
    train, val = _training_data(args)
    resolved, config, transform = _inputs.load_model(args, num_classes=len(train.classes))
    _check_classes(resolved, train.classes, "--train-dir")
    oods = _inputs.ood_loaders(args.ood_dir, transform, args)
    # Options of newer tune() versions, passed only where accepted.
    options = {
        "epochs": args.epochs,
        "progress": _inputs.progress(args),
        "verbose": True,  # the plan and estimate up front, the table at the end
        "finetunes": args.finetunes,
        "scores": args.scores,
        "promote": args.promote,
        "fusion": args.fusion,
    }
    accepted = inspect.signature(tune).parameters
    result = tune(
        resolved.model,
        _inputs.labelled_loader(train, transform, args, shuffle=True),
        _inputs.labelled_loader(val, transform, args),
        oods or None,
        max_accuracy_drop=args.max_accuracy_drop,
        seed=args.seed,
        time_budget=args.time_budget,
        **{k: v for k, v in options.items() if k in accepted and v is not None},
    )
    print(f"Chosen: {result.best_name}")
    if args.json:
        write_atomic(args.json, json.dumps(result.to_dict(), indent=2, default=str))
        print(f"Report: {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"Plot: {args.plot}")
    _save_best(result, args, train.classes, config)
    return 0
