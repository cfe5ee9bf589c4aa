"""The checkpoint layout: file names, format version, reading and writing its JSON.

A checkpoint folder (and the Hub repo it is pushed to) holds:

| File | Content |
|---|---|
| `model.safetensors` | The plain `state_dict` of the unleashed model, UMAP masks baked in (pruned weights are exact zeros). |
| `config.json` | timm models only: timm's own Hub config, written by timm's `save_config_for_hf`, with the preprocessing the model was trained with, so `timm.create_model("hf-hub:<repo>", pretrained=True)` (or `"local-dir:<folder>"`) and `timm.data.resolve_data_config` work without oodunleash. |
| `oodunleash_config.json` | oodunleash's record: format version, the wrapper's constructor arguments, ξ, the masked layers, the architecture, class names, training history, fitted-score configs, the last results, a SHA-256 of every other file and a digest of each field a fit learnt (`field_sha256`: a hand edit of `fitted`, ξ, the history or the masks is refused). Validated against its schema on loading. |
| `oodunleash_scores.safetensors` | The fitted state of every fitted OOD score, keys prefixed `<score>/`. |
| `oodunleash_calibration.safetensors` | Only for a calibrated wrapper (`calibrate`): the default score's values on the held-out ID calibration images (float64), read back by `predict`. |
| `oodunleash_masks.safetensors` | Only with `keep_masks=True` (UMAP): per layer the mask scores, the mask as packed bits and the dense values of the pruned weights, so that training can go on. |
| `README.md` | A generated model card (its SHA-256 is recorded, so a card edited by hand is never overwritten silently). |

Nothing read from a checkpoint is ever imported or unpickled: tensors come from safetensors,
everything else from JSON; timm architectures are rebuilt by name and a custom architecture
must be handed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

from oodunleash.checkpoint.errors import CorruptCheckpointError, IncompatibleCheckpointError

__all__ = [
    "CALIBRATION_NAME",
    "CHECKPOINT_FILES",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MASKS_NAME",
    "MODEL_CARD_NAME",
    "SCORES_NAME",
    "TIMM_CONFIG_NAME",
    "WEIGHTS_NAME",
]

#: Version of the layout. A reader refuses a newer *major* version and reads a newer minor
#: version with a warning (minor versions only add fields). 2.0 records the wrapper's
#: constructor arguments as one ``params`` object; 1.x checkpoints are converted on loading.
#: 2.1 adds the conformal calibration (``calibration`` and its file).
FORMAT_VERSION = "2.1"

WEIGHTS_NAME = "model.safetensors"
TIMM_CONFIG_NAME = "config.json"
CONFIG_NAME = "oodunleash_config.json"
SCORES_NAME = "oodunleash_scores.safetensors"
MASKS_NAME = "oodunleash_masks.safetensors"
CALIBRATION_NAME = "oodunleash_calibration.safetensors"
MODEL_CARD_NAME = "README.md"

#: Every file the config may list (the model card is recorded apart: users may edit it).
CHECKPOINT_FILES = (
    CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, MASKS_NAME, CALIBRATION_NAME,
)  # fmt: skip
TENSOR_FILES = (WEIGHTS_NAME, SCORES_NAME, MASKS_NAME, CALIBRATION_NAME)


def package_version() -> str:
    from oodunleash._version import __version__

    return __version__


def to_json(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings and numpy/torch scalars as numbers."""
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def check_json(value: Any, what: str) -> Any:
    """:func:`to_json`, refusing what JSON cannot hold with an error naming ``what``."""
    value = to_json(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}.") from exc
    return value


def dump_json(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged file is a :class:`CorruptCheckpointError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} is not valid JSON ({exc}); the file is damaged. "
            "Re-download it (force_download=True) or save the checkpoint again."
        ) from exc
    except RecursionError as exc:  # a hostile file: thousands of nested brackets
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} nests its JSON too deeply to read: oodunleash never "
            "writes such a file, so it was altered. Save the checkpoint again."
        ) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} must hold a JSON object, not {type(data).__name__}."
        )
    return data


def _parse_version(text: Any, where: str = "oodunleash") -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    if match is None:
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where}: field 'format_version' must look like '2.0', got "
            f"{text!r}. The file was altered or damaged: save the checkpoint again."
        )
    return int(match[1]), int(match[2])


def format_major(config: dict[str, Any], where: str) -> int:
    """The major format version of ``config``, after refusing versions this reader cannot read
    (and warning about a newer minor version)."""
    if "format_version" not in config:
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where} has no field 'format_version': it was not written by "
            "oodunleash."
        )
    major, minor = _parse_version(config["format_version"], where)
    ours_major, ours_minor = _parse_version(FORMAT_VERSION)
    written_by = config.get("oodunleash_version", "an unknown version")
    if major > ours_major or major < 1:
        raise IncompatibleCheckpointError(
            f"The checkpoint in {where} uses format {config['format_version']} (written by "
            f"oodunleash {written_by}); oodunleash {package_version()} reads formats 1.x to "
            f"{ours_major}.x. Upgrade oodunleash: pip install -U oodunleash."
        )
    if major == ours_major and minor > ours_minor:
        warnings.warn(
            f"The checkpoint in {where} uses format {config['format_version']}, newer than "
            f"this oodunleash ({FORMAT_VERSION}); fields it does not know are ignored.",
            stacklevel=4,
        )
    return major


def listed_files(config: dict[str, Any], where: str) -> list[str]:
    """The files ``config`` lists; only known names, so a config cannot point anywhere else."""
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where}: field 'files' must list the checkpoint's files "
            f"({WEIGHTS_NAME} at least), got {files!r}."
        )
    unknown = [name for name in files if name not in CHECKPOINT_FILES]
    if unknown:
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where}: field 'files' lists unknown files {unknown}."
        )
    return list(files)


def owned_files(folder: Path) -> set[str]:
    """The entries of ``folder`` that an earlier save wrote: the files its config lists, and
    the model card while it is as written (a card edited by hand is the user's)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return set()
    try:
        config = read_json(config_path)
    except CorruptCheckpointError:  # a damaged config proves nothing: every file is the user's
        return set()
    if "format_version" not in config or not isinstance(config.get("files"), dict):
        return set()
    ours = {CONFIG_NAME} | {n for n in config["files"] if n in CHECKPOINT_FILES}
    card = folder / MODEL_CARD_NAME
    if card.is_file():
        # Format 1 recorded no checksum of its card, so a hand edit cannot be told from the
        # card it wrote: that card counts as the user's (saving over it asks for overwrite).
        recorded = config.get("card_sha256")
        if isinstance(recorded, str) and recorded == sha256_file(card):
            ours.add(MODEL_CARD_NAME)
    return ours
