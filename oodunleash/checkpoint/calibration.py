"""A conformal calibration in a checkpoint: which score as JSON, its values as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from oodunleash.checkpoint.errors import CorruptCheckpointError
from oodunleash.checkpoint.format import CALIBRATION_NAME, CONFIG_NAME, check_json
from oodunleash.checkpoint.tensors import load_tensors

__all__ = ["calibration_for_saving", "restore_calibration"]

_KEY = "scores"


def calibration_for_saving(calibration: Any) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """The config's ``calibration`` entry and the tensors of its file (none when uncalibrated)."""
    if calibration is None:
        return None, {}
    entry = {
        "score": calibration.score,
        "score_config": check_json(dict(calibration.score_config), "The calibrated score's config"),
        "n": calibration.n,
    }
    return entry, {_KEY: calibration.scores.contiguous()}


def _refuse(where: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{CONFIG_NAME} in {where}: field 'calibration' {problem}. The file was altered or "
        "damaged: save the checkpoint again (or calibrate again and save)."
    )


def restore_calibration(folder: Path, entry: Any, where: str) -> Any:
    """The recorded :class:`~oodunleash.decision.Calibration`, or ``None``; the entry and the
    tensor file are checked against each other."""
    if entry is None:
        return None
    from oodunleash.decision import Calibration

    if not isinstance(entry, dict):
        raise _refuse(where, f"must be an object or null, got {entry!r}")
    n = entry.get("n")
    if not isinstance(entry.get("score"), str):
        raise _refuse(where, "must name its score ('score': a string)")
    if not isinstance(entry.get("score_config", {}), dict):
        raise _refuse(where, "must hold the score's options ('score_config': an object)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _refuse(where, f"must count its images ('n': a positive integer), got {n!r}")
    path = folder / CALIBRATION_NAME
    if not path.is_file():
        raise CorruptCheckpointError(
            f"The checkpoint in {where} is calibrated but {CALIBRATION_NAME} is missing."
        )
    tensors = load_tensors(path)
    scores = tensors.get(_KEY)
    if set(tensors) != {_KEY} or scores is None or scores.dim() != 1 or scores.numel() != n:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise CorruptCheckpointError(
            f"{CALIBRATION_NAME} in {where} should hold {n} calibration scores under "
            f"{_KEY!r}, holds {shapes}: the file is damaged."
        )
    if bool(scores.isnan().any()):
        raise CorruptCheckpointError(f"{CALIBRATION_NAME} in {where} holds NaN scores.")
    return Calibration(scores, entry["score"], dict(entry.get("score_config") or {}))
