"""What the command line does to the images: the model's input channels, a one-line account of
the preprocessing, and the hint given when the model seems not to recognise its own data."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from oodunleash.cli._errors import UsageError

__all__ = [
    "FLAGS_HINT",
    "default_workers",
    "describe",
    "input_channels",
    "match_channels",
    "mismatch_hint",
    "near_chance",
]

#: The flags that set the preprocessing, as the hints name them.
FLAGS_HINT = "--img-size, --mean, --std, --interpolation and --crop-pct"


def default_workers() -> int:
    """Data-loading processes by default: up to 4, one core left to the main process (0 on a
    single core), so PyTorch never warns that the workers outnumber the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def input_channels(model: nn.Module) -> int | None:
    """The channels the model's first convolution reads (a ViT's patch embedding is one), or
    ``None`` when it has none."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return int(module.in_channels)
    return None


def match_channels(config: dict[str, Any], channels: int | None) -> dict[str, Any]:
    """``config`` with its input size, mean and std made to the model's channels: a mean or
    std given once (or the same for every channel) is repeated; anything else is refused."""
    if channels is None:
        return config
    out = dict(config)
    out["input_size"] = (channels, *tuple(config["input_size"])[1:])
    for key in ("mean", "std"):
        values = tuple(config[key])
        if len(values) == channels:
            continue
        if len(set(values)) == 1:
            out[key] = values[:1] * channels
            continue
        raise UsageError(
            f"The model reads {channels}-channel images but the {key} has {len(values)} values "
            f"{list(values)}: pass --{key} with 1 or {channels} number(s)."
        )
    return out


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def describe(config: Mapping[str, Any], source: str) -> str:
    """One line: what each image goes through, and where those settings came from."""
    channels, height, width = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct") or 1.0)
    resize = math.floor(min(height, width) / crop_pct)
    crop = "no crop" if resize == min(height, width) else f"centre crop {height}x{width}"
    mode = "grayscale" if channels == 1 else "RGB"
    return (
        f"preprocessing ({source}): {mode} {channels}x{height}x{width}; resize the short side to "
        f"{resize} px ({config['interpolation']}, crop_pct {crop_pct:g}), {crop}; "
        f"mean {_numbers(config['mean'])}, std {_numbers(config['std'])}"
    )


def near_chance(accuracy: float, classes: int) -> bool:
    """Whether an accuracy is within a tenth of the way from chance to perfect."""
    chance = 1 / max(classes, 1)
    return accuracy <= chance + 0.1 * (1 - chance)


def mismatch_hint(config: Mapping[str, Any]) -> str:
    """The sentence that says the images may be preprocessed unlike in training."""
    return (
        "The images may be preprocessed differently from how the model was trained (this run: "
        f"{describe(config, 'used').split(': ', 1)[1]}). Set {FLAGS_HINT} to what training used."
    )
