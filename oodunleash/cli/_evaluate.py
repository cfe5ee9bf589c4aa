"""``oodunleash evaluate``, ``score``, ``calibrate`` and ``list-scores``."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from oodunleash.cli import _data, _inputs
from oodunleash.cli._calibrate import calibrate_from_dir, decision_csv, write_or_print
from oodunleash.cli._errors import UsageError
from oodunleash.scores import get_score, list_scores
from oodunleash.scores.resolve import resolve_scores
from oodunleash.scores.spec import ScoreSpec
from oodunleash.wrapper import OODUnleash

__all__ = ["cmd_calibrate", "cmd_evaluate", "cmd_list_scores", "cmd_score"]


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


def check_and_fit_scores(
    unleashed: OODUnleash, names: Sequence, transform, args: argparse.Namespace, flag: str
) -> None:
    """Fit from ``--fit-dir`` the scores in ``names`` that learn and are not fitted yet."""
    _fit_scores(unleashed, _check_scores(unleashed, names, args.fit_dir, flag), transform, args)


def cmd_score(args: argparse.Namespace) -> int:
    """Per-image OOD scores (higher = more in-distribution) as CSV: ``path,score``; with
    ``--alpha``, ``path,label,score,p_value,is_ood``."""
    from tqdm.auto import tqdm

    resolved, config, transform = _inputs.load_model(args, announce=False)
    unleashed = resolved.wrapper()
    name = args.score or _default_label(unleashed)
    check_and_fit_scores(unleashed, [name], transform, args, "--score")
    images = _data.loose_images(args.inputs, transform, "IMAGE_OR_DIR")
    for flag, given in (("--calib-dir", args.calib_dir), ("--fdr", args.fdr)):
        if given and args.alpha is None:
            raise UsageError(f"{flag} goes with --alpha: pass --alpha too (e.g. 0.05).")
    if args.alpha is not None:
        unleashed.default_score = name
        if args.calib_dir:
            calibrate_from_dir(unleashed, args, transform, args.alpha)
        text, flagged = decision_csv(unleashed, images, args)
        write_or_print(text, args.out, f"{flagged} of {len(images)} images flagged OOD: {args.out}")
        return 0
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
    print(_inputs.preprocessing_line(resolved, config, args), file=sys.stderr)
    write_or_print(text.getvalue(), args.out, f"Scores of {len(rows)} images ({name}): {args.out}")
    return 0


#: How list-scores names what a score reads (oodunleash.scores.REQUIREMENTS).
_READS = {
    "features": "penultimate features",
    "feature_maps": "pre-pool feature maps",
    "gradients": "input gradients",
    "head": "head weights",
    "labels": "training labels",
}


def cmd_list_scores(args: argparse.Namespace) -> int:
    """Every registered score, what it reads from the model, and whether it learns from ID
    training data (``--fit-dir``)."""
    del args
    for name in list_scores():
        score = get_score(name)
        reads = ", ".join(_READS.get(r, r) for r in sorted(score.requires)) or "nothing"
        fit = "; needs --fit-dir" if score.needs_fit else ""
        print(f"{name:<22}reads {reads}{fit}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a checkpoint's default score on held-out ID images and save it."""
    from oodunleash.cli._train import save_checkpoint

    resolved, config, transform = _inputs.load_model(args)
    if resolved.unleashed is None:
        raise UsageError(
            f"MODEL {args.model}: calibrate needs an oodunleash checkpoint folder (written by "
            "`oodunleash fit` or save_pretrained), which the calibration is saved into."
        )
    unleashed = resolved.unleashed
    if args.score:
        unleashed.default_score = args.score
    check_and_fit_scores(unleashed, [unleashed.default_score], transform, args, "--score")
    calibrate_from_dir(unleashed, args, transform, args.alpha)
    out = Path(args.out or args.model)
    names = getattr(unleashed, "class_names", None)
    folder = save_checkpoint(unleashed, out, class_names=names, preprocessing=config)
    print(f"Saved: {folder}")
    return 0
