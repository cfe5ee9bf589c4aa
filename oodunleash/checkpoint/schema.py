"""The schema of ``oodunleash_config.json``: what each field must hold, checked on loading so
that a tampered or damaged file is refused with the file and field named, and the conversion of
format 1.x configs to the current layout."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import CorruptCheckpointError
from .format import CONFIG_NAME

__all__ = ["upgrade_v1", "validate_config"]

_MISSING = object()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _history(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(epoch, dict)
        and all(isinstance(k, str) and (v is None or _number(v)) for k, v in epoch.items())
        for epoch in value
    )


def _score_entry(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and isinstance(value.get("config", {}), dict)
        and _str_list(value.get("tensors", []))
    )


def _masks(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("storage") in ("baked", "scores")
        and _number(value.get("sparsity", 0.0))
        and 0.0 <= value.get("sparsity", 0.0) <= 1.0
        and _number(value.get("keep_ratio"))
        and 0.0 < value["keep_ratio"] <= 1.0
        and value.get("mode") in ("layer", "model")
        and value.get("init") in ("random", "magnitude")
        and isinstance(value.get("seed"), int)
    )


_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("params", lambda v: isinstance(v, dict), "an object of constructor arguments"),
    ("params.method", lambda v: v in ("um", "umap"), "'um' or 'umap'"),
    ("fitted", lambda v: isinstance(v, bool), "true or false"),
    (
        "loss_constraint",
        _optional(lambda v: _number(v) and v > 0),
        "a positive finite number, or null (plain cross-entropy)",
    ),
    ("layer_names", _str_list, "a list of layer names (strings)"),
    ("training", lambda v: isinstance(v, dict), "an object"),
    ("training.history", _history, "a list of per-epoch objects of numbers"),
    ("training.config", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("class_names", _optional(_str_list), "a list of strings or null"),
    ("masks", _optional(_masks), "null or an object (storage, sparsity, keep_ratio, ...)"),
    ("model", lambda v: isinstance(v, dict), "an object describing the architecture"),
    ("model.class", lambda v: isinstance(v, str), "the model's qualified class name"),
    ("model.source", lambda v: v in ("timm", "custom"), "'timm' or 'custom'"),
    ("model.model_args", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    (
        "scores",
        lambda v: isinstance(v, dict) and all(_score_entry(e) for e in v.values()),
        "an object of fitted scores, each with a 'name', a 'config' object and 'tensors'",
    ),
    ("results", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("preprocessing", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("card_sha256", _optional(lambda v: isinstance(v, str)), "a SHA-256 hex string or null"),
]


def _lookup(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def validate_config(config: dict[str, Any], where: str) -> None:
    """Check every field of a (current-format) config; the first wrong one is named.

    Example:
        >>> validate_config({"params": {"method": "dense"}}, "my-folder")
        Traceback (most recent call last):
        ...
        oodunleash.checkpoint.errors.CorruptCheckpointError: oodunleash_config.json in my-folder: field 'params.method' must be 'um' or 'umap', got 'dense'. The file was altered or damaged: save the checkpoint again, or fix that field.
    """
    for path, check, expected in _FIELDS:
        value = _lookup(config, path)
        if value is _MISSING or not check(value):
            shown = "nothing (the field is missing)" if value is _MISSING else repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise CorruptCheckpointError(
                f"{CONFIG_NAME} in {where}: field {path!r} must be {expected}, got {shown}. "
                "The file was altered or damaged: save the checkpoint again, or fix that field."
            )


_V1_PARAMS = {  # format 1.x top-level field -> constructor argument of oodunleash 0.1
    "method": "method",
    "keep_ratio": "keep_ratio",
    "mask_mode": "mask_mode",
    "mask_init": "mask_init",
    "constraint": "constraint",
    "constraint_factor": "constraint_factor",
    "constraint_keep_ratio": "constraint_keep_ratio",
    "default_score": "score",
    "seed": "seed",
    "head": "head",
    "feature_layer": "feature_layer",
}


def upgrade_v1(config: dict[str, Any]) -> dict[str, Any]:
    """A format 1.x config in the current layout (what oodunleash 0.1 wrote: the options as
    top-level fields, masks without their options, only fitted wrappers)."""
    params = {new: config[old] for old, new in _V1_PARAMS.items() if config.get(old) is not None}
    masks = config.get("masks")
    if isinstance(masks, dict):
        masks = {
            **masks,
            "keep_ratio": config.get("keep_ratio"),
            "mode": config.get("mask_mode", "layer"),
            "init": config.get("mask_init", "random"),
            "seed": config.get("seed", 0),
        }
    return {
        **config,
        "params": params,
        "fitted": True,
        "masks": masks,
        "preprocessing": None,
        "card_sha256": None,
    }
