"""``oodunleash calibrate`` and ``oodunleash score --alpha``: in-or-out decisions with a
guaranteed false-alarm rate (conformal p-values on held-out ID images)."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Any

from oodunleash.cli import _data, _inputs
from oodunleash.cli._errors import UsageError
from oodunleash.decision import NotCalibratedError
from oodunleash.runtime.files import write_atomic
from oodunleash.wrapper import OODUnleash

__all__ = ["calibrate_from_dir", "decision_csv", "write_or_print"]


def calibrate_from_dir(
    unleashed: OODUnleash, args: argparse.Namespace, transform: Any, alpha: float | None
) -> None:
    """Calibrate on every image under ``--calib-dir`` (class sub-folders optional)."""
    images = _data.loose_images([args.calib_dir], transform, "--calib-dir")
    loader = _data.loader(images, args.batch_size, args.workers)
    try:
        unleashed.calibrate(loader, alpha=alpha, progress=_inputs.progress(args))
    except ValueError as exc:  # too few images for alpha
        raise UsageError(f"--calib-dir {args.calib_dir}: {exc}") from None
    print(f"Calibrated on {len(images)} images ({unleashed.calibration_.score}).", file=sys.stderr)


def _label(index: int, names: list[str] | None) -> str:
    return names[index] if names and 0 <= index < len(names) else str(index)


def decision_csv(
    unleashed: OODUnleash, images: _data.LooseImages, args: argparse.Namespace
) -> tuple[str, int]:
    """``path,label,score,p_value,is_ood`` for every image, and how many were flagged."""
    loader = _data.loader(images, args.batch_size, args.workers)
    try:
        result = unleashed.predict(
            loader, args.alpha, fdr=args.fdr, progress=_inputs.progress(args)
        )
    except NotCalibratedError as exc:
        raise UsageError(
            f"{exc} On the command line: pass --calib-dir DIR (held-out ID images), or run "
            "`oodunleash calibrate` on the checkpoint first."
        ) from None
    except ValueError as exc:  # alpha out of range, or too small for the calibration
        raise UsageError(f"--alpha {args.alpha}: {exc}") from None
    names = getattr(unleashed, "class_names", None)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "score", "p_value", "is_ood"])
    for i, path in enumerate(images.paths):
        writer.writerow(
            [
                str(path),
                _label(int(result.labels[i]), names),
                f"{float(result.scores[i]):.8g}",
                f"{float(result.p_values[i]):.6g}",
                int(result.is_ood[i]),
            ]
        )
    return text.getvalue(), int(result.is_ood.sum())


def write_or_print(text: str, out: str | None, message: str) -> None:
    """The CSV to ``out`` (with ``message`` on stderr), else to stdout."""
    if out:
        write_atomic(out, text)
        print(message, file=sys.stderr)
    else:
        sys.stdout.write(text)
