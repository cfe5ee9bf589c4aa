"""The schema of ``oodunleash_config.json``: what each field must hold, checked on loading so
that a tampered or damaged file is refused with the file and field named, and the conversion of
format 1.x configs to the current layout."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from oodunleash.checkpoint.errors import CorruptCheckpointError
from oodunleash.checkpoint.format import CONFIG_NAME
from oodunleash.config import UnleashConfig

__all__ = ["upgrade_v1", "validate_config"]

_MISSING = object()
_NOT_RECORDED = object()  # a field inside an optional object that is null


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


_SCORE_FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("name", lambda v: isinstance(v, str), "the score's registry name"),
    ("config", lambda v: isinstance(v, dict), "an object of the score's arguments"),
    ("tensors", _str_list, "a list of tensor names"),
]


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
    ("masks", _optional(lambda v: isinstance(v, dict)), "null or an object"),
    ("masks.storage", lambda v: v in ("baked", "scores"), "'baked' or 'scores'"),
    ("masks.sparsity", lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
    ("masks.keep_ratio", lambda v: _number(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    ("masks.mode", lambda v: v in ("layer", "model"), "'layer' or 'model'"),
    ("masks.init", lambda v: v in ("random", "magnitude"), "'random' or 'magnitude'"),
    ("masks.seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ("model", lambda v: isinstance(v, dict), "an object describing the architecture"),
    ("model.class", lambda v: isinstance(v, str), "the model's qualified class name"),
    ("model.source", lambda v: v in ("timm", "custom"), "'timm' or 'custom'"),
    ("model.model_args", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("scores", lambda v: isinstance(v, dict), "an object of fitted scores"),
    ("results", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("preprocessing", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("card_sha256", _optional(lambda v: isinstance(v, str)), "a SHA-256 hex string or null"),
]


def _lookup(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if value is None and value is not config:
            return _NOT_RECORDED
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _refuse(path: str, value: Any, expected: str, where: str) -> CorruptCheckpointError:
    shown = "nothing (the field is missing)" if value is _MISSING else repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return CorruptCheckpointError(
        f"{CONFIG_NAME} in {where}: field {path!r} must be {expected}, got {shown}. "
        "The file was altered or damaged: save the checkpoint again, or fix that field."
    )


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
        if value is _NOT_RECORDED:
            continue
        if value is _MISSING or not check(value):
            raise _refuse(path, value, expected, where)
    for key, entry in config["scores"].items():
        if not isinstance(entry, dict):
            raise _refuse(f"scores.{key}", entry, "an object (name, config, tensors)", where)
        for field, check, expected in _SCORE_FIELDS:
            value = entry.get(field, _MISSING)
            if value is _MISSING or not check(value):
                raise _refuse(f"scores.{key}.{field}", value, expected, where)


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
    # 0.1's options in today's form (ξ recipe folded, UM's unused mask options dropped); if
    # they are invalid they stay as recorded, and loading names the 'params' field.
    with contextlib.suppress(TypeError, ValueError):
        params = UnleashConfig.from_legacy(config).to_dict()
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
