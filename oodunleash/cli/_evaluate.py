"""``oodunleash evaluate``, ``oodunleash score`` and ``oodunleash list-scores``."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence

from .._files import write_atomic
from ..scores import get_score, list_scores
from ..scores.base import resolve_scores
from ..scores.spec import ScoreSpec
from ..wrapper import OODUnleash
from . import _data, _inputs
from ._errors import UsageError

__all__ = ["cmd_evaluate", "cmd_list_scores", "cmd_score"]


def _default_label(unleashed: OODUnleash) -> str:
    """The default score as the key it is fitted under (else its label): a tuned checkpoint's
    ``knn k=1`` is read from its fitted bank, whatever key an older version stored it under."""
    default = unleashed.default_score
    try:
        spec = ScoreSpec.of(default)
    except (TypeError, ValueError):  # an instance of an unregistered score
        return getattr(default, "name", str(default))
    found = spec.find(unleashed.fitted_scores_)
    return found[0] if found is not None else spec.label


def _check_scores(
    unleashed: OODUnleash, names: Sequence[str], fit_dir: str | None, flag: str
) -> list[str]:
    """Known score names or labels, each either fitted already or fittable from ``--fit-dir``."""
    unfitted = []
    for name in names:
        _inputs.check_score(name, flag)
        resolved = resolve_scores(name, unleashed.fitted_scores_)
        if not all(score.is_fitted for score in resolved.values()):
            unfitted.append(name)
    if unfitted and fit_dir is None:
        raise UsageError(
            f"The score(s) {', '.join(unfitted)} learn from in-distribution training data: pass "
            "--fit-dir DIR (the ID training images, one sub-folder per class), or pick scores "
            "from `oodunleash list-scores` that need no fitting (energy, msp, maxlogit, ...)."
        )
    return unfitted


def _fit_scores(
    unleashed: OODUnleash, names: list[str], transform, args: argparse.Namespace
) -> None:
    if not names:
        return
    fit_set = _data.labelled_folder(args.fit_dir, "--fit-dir")
    unleashed.fit_scores(
        _inputs.labelled_loader(fit_set, transform, args), names, progress=_inputs.progress(args)
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """ID test set against OOD sets: AUROC, AUPR and FPR95 per score; a table, JSON on request."""
    id_set = _data.labelled_folder(args.id_dir, "--id-dir")
    resolved, _, transform = _inputs.load_model(args, num_classes=len(id_set.classes))
    unleashed = resolved.wrapper()
    scores = args.scores or [_default_label(unleashed), *unleashed.fitted_scores_]
    scores = list(dict.fromkeys(scores))  # in order, once each
    _fit_scores(
        unleashed, _check_scores(unleashed, scores, args.fit_dir, "--scores"), transform, args
    )
    oods = _inputs.ood_loaders(args.ood_dir, transform, args)
    results = unleashed.evaluate(
        _inputs.labelled_loader(id_set, transform, args),
        oods,
        scores,
        progress=_inputs.progress(args),
    )
    print(results.table())
    if args.json:
        results.to_json(args.json)
        print(f"JSON: {args.json}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Per-image OOD scores (higher = more in-distribution) as CSV: ``path,score``."""
    from tqdm.auto import tqdm

    resolved, _, transform = _inputs.load_model(args)
    unleashed = resolved.wrapper()
    name = args.score or _default_label(unleashed)
    _fit_scores(
        unleashed, _check_scores(unleashed, [name], args.fit_dir, "--score"), transform, args
    )
    images = _data.loose_images(args.inputs, transform, "IMAGE_OR_DIR")
    rows = []
    position = 0
    batches = _data.loader(images, args.batch_size, args.workers)
    for batch in tqdm(batches, desc=f"score ({name})", disable=not _inputs.progress(args)):
        values = unleashed.score(batch.to(unleashed.device), name).float().cpu().tolist()
        for value in values:
            rows.append((str(images.paths[position]), value))
            position += 1
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((path, f"{value:.8g}") for path, value in rows)
    if args.out:
        write_atomic(args.out, text.getvalue())
        print(f"Scores of {len(rows)} images ({name}): {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text.getvalue())
    return 0


def cmd_list_scores(args: argparse.Namespace) -> int:
    """Every registered score, and whether it learns from ID training data (``--fit-dir``)."""
    del args
    for name in list_scores():
        fit = "needs --fit-dir" if get_score(name).needs_fit else ""
        print(f"{name:<22}{fit}".rstrip())
    return 0
