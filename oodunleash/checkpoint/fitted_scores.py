"""Fitted OOD scores in a checkpoint: configuration as JSON, state as safetensors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from oodunleash.checkpoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from oodunleash.checkpoint.format import SCORES_NAME, check_json
from oodunleash.checkpoint.tensors import load_tensors, split_prefixed, tensors_for_saving

__all__ = ["restore_scores", "scores_for_saving"]


def scores_for_saving(scores: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Per score its registry name, class, config and tensor names; and its tensors, prefixed
    ``<key>/``."""
    configs: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for key, score in scores.items():
        if "/" in key:
            raise ValueError(f"Fitted score names may not contain '/': {key!r}.")
        state = tensors_for_saving(score.state_dict(), f"The {key!r} score's state")
        cls = type(score)
        configs[key] = {
            "name": getattr(score, "name", key),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "config": check_json(score.get_config(), f"The {key!r} score's config"),
            "tensors": sorted(state),
        }
        tensors.update({f"{key}/{k}": v for k, v in state.items()})
    return configs, tensors


def restore_scores(folder: Path, configs: dict[str, Any], where: str) -> dict[str, Any]:
    """The fitted scores, rebuilt by registry name (never by importing the recorded class)."""
    from oodunleash.scores import get_score

    path = folder / SCORES_NAME
    grouped = split_prefixed(load_tensors(path), path) if path.is_file() else {}
    restored: dict[str, Any] = {}
    for key, entry in configs.items():
        state = grouped.get(key, {})
        wanted = set(entry.get("tensors") or [])
        if wanted != set(state):
            raise CorruptCheckpointError(
                f"{SCORES_NAME} in {where}: score {key!r} should hold {sorted(wanted)}, holds "
                f"{sorted(state)}."
            )
        try:
            score = get_score(entry["name"], **dict(entry.get("config") or {}))
        except (ValueError, TypeError) as exc:
            raise IncompatibleCheckpointError(
                f"The checkpoint in {where} has a fitted {key!r} score this oodunleash cannot "
                f"rebuild ({exc}). Register it with oodunleash.scores.register_score before "
                "loading."
            ) from exc
        score.load_state_dict(state)
        restored[key] = score
    return restored
