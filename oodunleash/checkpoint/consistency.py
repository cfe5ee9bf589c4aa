"""Checks across the fields of ``oodunleash_config.json``, beyond each field's own type
(:mod:`.schema`): fields that contradict each other or the model, and fields edited by hand
after saving.

``save_pretrained`` records a short digest of each field that only a fit can set (``fitted``,
``loss_constraint``, ``layer_names``, ``training``, ``masks``) in ``field_sha256``; a
field that no longer matches its digest was edited after saving, and loading refuses it
rather than take it on trust (``fitted: false`` would load a fitted model as unfitted,
``loss_constraint: null`` would read a UM fit as the plain fine-tune control).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from torch import nn

from oodunleash.checkpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from oodunleash.checkpoint.format import CONFIG_NAME

__all__ = ["check_config_fields", "check_model_outputs", "field_digests", "num_outputs"]

#: The fields whose digests are recorded: what a fit learnt. The wrapper's options
#: (``params``), ``class_names`` and ``preprocessing`` may be edited; their values are checked.
DIGESTED = ("fitted", "loss_constraint", "layer_names", "training", "masks")


def num_outputs(model: nn.Module) -> int | None:
    """The model's number of classes: its ``num_classes``, else its last ``Linear``'s outputs."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def field_digests(config: dict[str, Any]) -> dict[str, str]:
    """The ``field_sha256`` record of ``config``."""
    return {name: _digest(config.get(name)) for name in DIGESTED}


def _bad(where: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{CONFIG_NAME} in {where}: {problem}. The file was altered or damaged: save the "
        "checkpoint again from the wrapper (save_pretrained), or put the field back."
    )


def _check_digests(config: dict[str, Any], where: str) -> None:
    recorded = config.get("field_sha256")
    if recorded is None:  # written before digests were recorded
        return
    if not isinstance(recorded, dict):
        raise _bad(where, f"field 'field_sha256' must be an object, got {recorded!r}")
    for name in DIGESTED:
        if name in recorded and recorded[name] != _digest(config.get(name)):
            raise _bad(
                where,
                f"field {name!r} does not match the digest save_pretrained recorded for it "
                f"(now {json.dumps(config.get(name))[:80]}): it was edited after saving",
            )


def _positive_ints(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _numbers(value: Any, positive: bool = False) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v > 0 or not positive)
        for v in items
    )


def _check_preprocessing(pre: dict[str, Any] | None, where: str) -> None:
    if pre is None:
        return
    checks = {
        "input_size": (lambda v: _positive_ints(v, 3), "(channels, height, width), 3 positive integers"),
        "mean": (_numbers, "a finite number or one per channel"),
        "std": (lambda v: _numbers(v, positive=True), "a positive number or one per channel"),
        "crop_pct": (lambda v: _numbers(v, positive=True), "a positive fraction"),
        "interpolation": (lambda v: isinstance(v, str), "a name such as 'bicubic'"),
    }  # fmt: skip
    for key, (check, expected) in checks.items():
        if key in pre and not check(pre[key]):
            raise _bad(where, f"field 'preprocessing.{key}' must be {expected}, got {pre[key]!r}")


def _check_layers_param(params: dict[str, Any], where: str) -> None:
    layers = params.get("layers")
    items = [layers] if isinstance(layers, str) else layers
    valid = layers is None or (
        isinstance(items, list)
        and all(
            isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("type"), str))
            for v in items
        )
    )
    if not valid:
        raise _bad(
            where,
            "field 'params.layers' must be null, a layer name pattern or a list of them, got "
            f"{layers!r}",
        )


def check_config_fields(config: dict[str, Any], where: str) -> None:
    """Refuse fields that contradict each other or were edited after saving."""
    _check_digests(config, where)
    _check_layers_param(config["params"], where)
    _check_preprocessing(config.get("preprocessing"), where)
    history = config["training"]["history"]
    if config["fitted"] and not history:
        raise _bad(where, "field 'fitted' is true, but 'training.history' records no epoch")
    if not config["fitted"] and (history or config["masks"] is not None):
        raise _bad(
            where,
            "field 'fitted' is false, but the checkpoint holds a fit ('training.history' or "
            "'masks' is filled)",
        )
    names, classes = config["class_names"], config["model"].get("num_classes")
    if classes is not None and not (isinstance(classes, int) and classes > 0):
        raise _bad(where, f"field 'model.num_classes' must be a positive integer, got {classes!r}")
    if names is not None and classes is not None and len(names) != classes:
        raise _bad(
            where,
            f"field 'class_names' has {len(names)} names but 'model.num_classes' is {classes}",
        )


def check_model_outputs(model: nn.Module, config: dict[str, Any], where: str) -> None:
    """The model built for the checkpoint has the class count its config records."""
    recorded, actual = config["model"].get("num_classes"), num_outputs(model)
    if recorded is not None and actual is not None and recorded != actual:
        raise CheckpointMismatchError(
            f"The checkpoint in {where} records {recorded} classes ('model.num_classes' in "
            f"{CONFIG_NAME}), but the model has {actual}. Pass the model the checkpoint was "
            "saved from, or fix that field."
        )
