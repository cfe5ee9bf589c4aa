"""Save, load and share unleashed checkpoints: a local folder or a Hugging Face Hub repo.

A checkpoint folder (and the Hub repo it is pushed to) holds:

| File | Content |
|---|---|
| `model.safetensors` | The plain `state_dict` of the unleashed model, UMAP masks baked in (pruned weights are exact zeros). |
| `config.json` | timm models only: timm's own Hub config (`architecture`, `num_classes`, `model_args`, `pretrained_cfg`), so that `timm.create_model("hf-hub:<repo>", pretrained=True)` (or `"local-dir:<folder>"`) gives the unleashed model without oodunleash installed. |
| `oodunleash_config.json` | oodunleash's own record: format version, method, ξ, keep ratio, chosen layers, the architecture and its arguments, class names, default score, training history, fitted-score configs, the last results and a SHA-256 of every tensor file. |
| `oodunleash_scores.safetensors` | The fitted state of every fitted OOD score (class means, precision, KNN bank, ...), keys prefixed `<score>/`. |
| `oodunleash_masks.safetensors` | Only with `keep_masks=True` (UMAP): per layer the mask scores, the mask as packed bits and the dense values of the pruned weights, so that training can go on. |
| `README.md` | A generated model card. |

Nothing read from a checkpoint is ever imported or unpickled: tensors come from safetensors,
everything else from JSON; timm architectures are rebuilt by name through ``timm.create_model``
and a custom architecture must be handed in by the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save as _save_safetensors
from torch import Tensor, nn

from ._files import write_atomic
from .constraint import DEFAULT_CONSTRAINT_FACTOR
from .distributed import is_main_process
from .masking import LayerMasks, topk_mask
from .training import TrainConfig

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MASKS_NAME",
    "SCORES_NAME",
    "TIMM_CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubMixin",
    "IncompatibleCheckpointError",
    "pack_bits",
    "unpack_bits",
]

#: Version of the checkpoint layout. A reader refuses a newer *major* version; a newer minor
#: version only adds fields, which are ignored (with a warning).
FORMAT_VERSION = "1.0"

WEIGHTS_NAME = "model.safetensors"
TIMM_CONFIG_NAME = "config.json"
CONFIG_NAME = "oodunleash_config.json"
SCORES_NAME = "oodunleash_scores.safetensors"
MASKS_NAME = "oodunleash_masks.safetensors"
MODEL_CARD_NAME = "README.md"

#: Every file a checkpoint may hold, except the model card (users may edit that one by hand).
_CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, MASKS_NAME)
_TENSOR_FILES = (WEIGHTS_NAME, SCORES_NAME, MASKS_NAME)

# pretrained_cfg entries naming where the *original* weights came from: they do not describe
# the unleashed checkpoint, and an entry such as `file` would make timm read another file.
_TIMM_SOURCE_KEYS = frozenset(
    {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "label_offset"}
)
# create_model keyword arguments that load weights or code from elsewhere: never taken from a
# downloaded config.
_TIMM_UNSAFE_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "pretrained_strict",
        "pretrained_filter_fn",
        "device",
        "dtype",
    }
)
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")

ModelFactory = Callable[..., nn.Module]
_Self = TypeVar("_Self", bound="HubMixin")


# --------------------------------------------------------------------------- errors
class HubError(Exception):
    """Base class of checkpoint and Hub errors.

    Attributes:
        local_copy: For a failed :meth:`~HubMixin.push_to_hub`: the folder holding the complete
            checkpoint that could not be uploaded (``None`` otherwise).
    """

    local_copy: Path | None = None


class CheckpointNotFoundError(HubError, FileNotFoundError):
    """The folder, repo, revision or one of its files does not exist (or is not readable)."""


class IncompatibleCheckpointError(HubError, ValueError):
    """The checkpoint was written by a newer, incompatible oodunleash or needs a newer timm."""


class CorruptCheckpointError(HubError, ValueError):
    """A checkpoint file is truncated, altered or unreadable."""


class CheckpointMismatchError(HubError, ValueError):
    """The model given to :meth:`~HubMixin.from_pretrained` does not match the checkpoint."""


class HubAuthError(HubError, PermissionError):
    """No Hugging Face token, or the token may not do what was asked."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub could not be reached (or failed) and no usable local copy was found."""


# --------------------------------------------------------------------------- bit packing
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean (or 0/1) tensor into ``uint8``, eight entries per byte, most significant
    bit first (the layout of ``numpy.packbits``). The shape is not stored.

    Example:
        >>> pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]))
        tensor([176, 128], dtype=torch.uint8)
    """
    flat = mask.detach().reshape(-1).to(torch.bool).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``.

    Example:
        >>> unpack_bits(torch.tensor([176, 128], dtype=torch.uint8), (9,)).int()
        tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.int32)
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{packed.numel()} packed bytes ({packed.dtype}) cannot hold a mask of shape "
            f"{tuple(shape)}."
        )
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))


# --------------------------------------------------------------------------- small helpers
def _version() -> str:
    from . import __version__  # read late: the package imports this module while loading

    return __version__


def _original_class(module: nn.Module) -> type:
    # A UMAP mask swaps a module's class for a generated subclass; report the user's class.
    return getattr(type(module), "_oodunleash_original_class", type(module))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()  # numpy / torch scalars
    return value


def _check_jsonable(value: Any, what: str) -> Any:
    value = _jsonable(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}.") from exc
    return value


def _describe_selector(selector: Any) -> Any:
    """Layer selectors as JSON: globs stay strings, module types become qualified names."""
    if selector is None:
        return None
    items = [selector] if isinstance(selector, str | type) else list(selector)
    return [item if isinstance(item, str) else {"type": _qualname(item)} for item in items]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors_for_saving(state: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    """CPU, contiguous, unshared tensors (safetensors refuses tensors sharing memory)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{what} entry {key!r} is a {type(value).__name__}, not a tensor; only tensors "
                "can be stored in safetensors."
            )
        tensor = value.detach().to("cpu").contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} is not valid JSON ({exc}); the file is damaged. "
            "Re-download it (force_download=True) or save the checkpoint again."
        ) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} must hold a JSON object.")
    return data


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return _load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} is not a readable safetensors file ({exc}). It is "
            "truncated or damaged: re-download it (force_download=True) or save it again."
        ) from exc


def _parse_version(text: Any) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    if match is None:
        raise CorruptCheckpointError(f"{CONFIG_NAME} has an invalid format_version {text!r}.")
    return int(match[1]), int(match[2])


def _check_format(config: dict, where: str) -> None:
    if "format_version" not in config:
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where} has no format_version; it was not written by oodunleash."
        )
    major, minor = _parse_version(config["format_version"])
    ours_major, ours_minor = _parse_version(FORMAT_VERSION)
    written_by = config.get("oodunleash_version", "an unknown version")
    if major != ours_major:
        newer = major > ours_major
        raise IncompatibleCheckpointError(
            f"The checkpoint in {where} uses format {config['format_version']} (written by "
            f"oodunleash {written_by}); oodunleash {_version()} reads format "
            f"{ours_major}.x only. "
            + (
                "Upgrade oodunleash: pip install -U oodunleash."
                if newer
                else "Load it with the oodunleash version that wrote it and save it again."
            )
        )
    if minor > ours_minor:
        warnings.warn(
            f"The checkpoint in {where} uses format {config['format_version']}, newer than "
            f"this oodunleash ({FORMAT_VERSION}); fields it does not know are ignored.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- timm
def _timm_architecture(model: nn.Module) -> str | None:
    """The registered timm architecture of ``model``, or ``None`` for any other model."""
    if not _original_class(model).__module__.startswith("timm."):
        return None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        return None
    import timm

    return architecture if timm.is_model(architecture) else None


def _timm_model_args(model: nn.Module, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``create_model`` keyword arguments that rebuild ``model``."""
    import timm.models

    if hasattr(timm.models, "get_model_args"):  # timm >= 1.0.20 records them at creation
        args = timm.models.get_model_args(model, dict(extra or {}))
    else:
        args = dict(getattr(model, "_model_args", {}) or {})
        args.update({k: getattr(model, k) for k in ("num_classes",) if hasattr(model, k)})
        args.update(extra or {})
    for key, value in list(args.items()):
        args[key] = _check_jsonable(
            value, f"The timm model argument {key!r} (pass model_kwargs={{{key!r}: ...}})"
        )
    return args


def _timm_hub_config(
    model: nn.Module, architecture: str, model_args: dict, class_names: list[str] | None
) -> dict[str, Any]:
    """timm's Hub ``config.json`` for ``model``: what ``timm.create_model("hf-hub:...")`` reads."""
    source = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}))
    keep_null = {"pool_size", "first_conv", "classifier"}
    pretrained = {
        k: _jsonable(v)
        for k, v in source.items()
        if k not in _TIMM_SOURCE_KEYS and (v is not None or k in keep_null)
    }
    pretrained = {k: v for k, v in pretrained.items() if _is_json(v)}
    pretrained.pop("architecture", None)
    num_classes = int(getattr(model, "num_classes", model_args.get("num_classes", 0)))
    if pretrained.get("num_classes") != num_classes:
        # Labels of the source head describe other classes.
        pretrained.pop("label_names", None)
        pretrained.pop("label_descriptions", None)
    pretrained["num_classes"] = num_classes
    pretrained["custom_load"] = False  # the export is a native timm state dict
    in_chans = model_args.get("in_chans")
    if in_chans and isinstance(pretrained.get("input_size"), list):
        pretrained["input_size"] = [in_chans, *pretrained["input_size"][1:]]
    config: dict[str, Any] = {"architecture": architecture, "num_classes": num_classes}
    num_features = getattr(model, "num_features", None)
    if isinstance(num_features, int):
        config["num_features"] = num_features
    pool = model_args.get("global_pool", getattr(model, "global_pool", None))
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    if class_names:
        config["label_names"] = list(class_names)
    config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained
    return config


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _build_timm_model(folder: Path) -> nn.Module:
    import timm
    from timm.models import PretrainedCfg

    config = _read_json(folder / TIMM_CONFIG_NAME)
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise IncompatibleCheckpointError(
            f"The checkpoint's timm architecture {architecture!r} is not known to the installed "
            f"timm {timm.__version__}: upgrade timm (pip install -U timm), or pass model= with "
            "the architecture."
        )
    args = {k: v for k, v in (config.get("model_args") or {}).items()}
    dropped = sorted(set(args) & _TIMM_UNSAFE_ARGS)
    for key in dropped:
        del args[key]
    if dropped:
        warnings.warn(f"Ignoring the checkpoint's model_args {dropped}.", stacklevel=3)
    if config.get("num_classes") is not None:
        args.setdefault("num_classes", config["num_classes"])
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    overlay = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (config.get("pretrained_cfg") or {}).items()
        if k in known and k not in _TIMM_SOURCE_KEYS
    }
    if config.get("label_names"):
        overlay["label_names"] = tuple(config["label_names"])
    return timm.create_model(architecture, pretrained=False, pretrained_cfg_overlay=overlay, **args)


# --------------------------------------------------------------------------- loading helpers
def _load_model_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking names and shapes (``model`` is left untouched
    when they do not match)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(v, Tensor) and tuple(v.shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = []
        if mismatched:
            lines.append("shape mismatch: " + "; ".join(mismatched))
        if missing:
            lines.append("missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            lines.append("not in the model: " + ", ".join(unexpected))
        raise CheckpointMismatchError(
            f"The model ({_qualname(_original_class(model))}) does not match the checkpoint in "
            f"{source}: " + " | ".join(lines) + ". Pass the architecture (and constructor "
            "arguments) the checkpoint was saved with."
        )
    model.load_state_dict(state, strict=True)


def _split_prefixed(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        prefix, sep, rest = key.partition("/")
        if not sep:
            raise CorruptCheckpointError(f"Unexpected tensor {key!r} in a prefixed file.")
        grouped.setdefault(prefix, {})[rest] = value
    return grouped


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or os.path.isabs(text)
    )


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_transport_error(exc: BaseException) -> bool:
    # requests raises OSError subclasses, httpx/httpx2 TransportError: match both by name so the
    # code does not depend on which HTTP library this huggingface_hub version uses.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError | TimeoutError) or bool(
        names & {"TransportError", "ConnectionError", "TimeoutException"}
    )


def _download_checkpoint(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    force_download: bool,
    local_files_only: bool,
) -> Path:
    """Fetch a checkpoint's files from the Hub into the cache; returns the snapshot folder."""
    import huggingface_hub.errors as hf_errors
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Newer clients report a partial cached snapshot with their own error.
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", LocalEntryNotFoundError)
    common = {
        "repo_id": repo_id,
        "repo_type": "model",
        "token": token,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
        "library_name": "oodunleash",
        "library_version": _version(),
    }
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        # The small config first: a repo that is no oodunleash checkpoint, or one from a newer
        # incompatible version, is refused before its weights are downloaded.
        folder = Path(snapshot_download(revision=revision, allow_patterns=[CONFIG_NAME], **common))
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(
                f"The Hub repo {where} has no {CONFIG_NAME}: it is not an oodunleash "
                "checkpoint. (A plain timm repo loads with timm.create_model('hf-hub:...'); "
                "wrap the result in OODUnleash.)"
            )
        config = _read_json(folder / CONFIG_NAME)
        _check_format(config, f"the Hub repo {where}")
        files = [name for name in _config_files(config) if name != CONFIG_NAME]
        # Pin the second download to the commit of the first, so a push in between cannot mix
        # files of two versions.
        pinned = folder.name if _COMMIT_HASH.match(folder.name) else revision
        if files:
            folder = Path(snapshot_download(revision=pinned, allow_patterns=files, **common))
    except RevisionNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"The Hub repo {repo_id!r} has no revision {revision!r} (branch, tag or commit) on "
            f"{_hub_endpoint()}."
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        local_hint = "" if "/" in repo_id else f" There is no local folder {repo_id!r} either."
        raise CheckpointNotFoundError(
            f"No Hub repo {repo_id!r} on {_hub_endpoint()}, or it is private or gated and the "
            f"token does not grant access (log in with `hf auth login` or pass token=...).{local_hint}"
        ) from exc
    except (LocalEntryNotFoundError, incomplete) as exc:
        raise HubConnectionError(
            f"Could not download {where} from {_hub_endpoint()} and no complete copy is in the "
            f"local cache{' (local_files_only=True)' if local_files_only else ''}. Check the "
            f"connection and retry. ({exc})"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubAuthError(
                f"The Hub refused access to {where} (HTTP {status}); check the token."
            ) from exc
        raise HubConnectionError(f"The Hub failed while downloading {where}: {exc}") from exc
    except HubError:
        raise
    except Exception as exc:
        if _is_transport_error(exc):
            raise HubConnectionError(
                f"The connection to {_hub_endpoint()} failed while downloading {where} "
                f"({type(exc).__name__}: {exc}). Retry, or load a cached copy with "
                "local_files_only=True."
            ) from exc
        raise
    return folder


def _config_files(config: dict) -> list[str]:
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise CorruptCheckpointError(f"{CONFIG_NAME} does not list the checkpoint's files.")
    unknown = [name for name in files if name not in _CHECKPOINT_FILES]
    if unknown:
        # Only the known names are ever opened: a config cannot point at arbitrary paths.
        raise CorruptCheckpointError(f"{CONFIG_NAME} lists unknown files {unknown}.")
    return list(files)


def _verify_files(folder: Path, config: dict) -> None:
    for name, info in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"The checkpoint in {folder} is incomplete: {name} is missing."
            )
        expected = (info or {}).get("sha256")
        if expected and _file_sha256(path) != expected:
            size = path.stat().st_size
            raise CorruptCheckpointError(
                f"{name} in {folder} does not match its recorded SHA-256 ({size} bytes on disk, "
                f"{info.get('size')} written): the file is truncated or altered. Re-download "
                "it (force_download=True) or save the checkpoint again; pass verify=False to "
                "load it anyway."
            )


def _restore_train_config(data: Any) -> TrainConfig | None:
    if not isinstance(data, dict):
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if isinstance(kwargs.get("energy_margins"), list):
        kwargs["energy_margins"] = tuple(kwargs["energy_margins"])
    try:
        return TrainConfig(**kwargs)
    except (TypeError, ValueError):
        return None


def _restore_results(data: dict[str, Any]) -> Any:
    from .results import EvaluationResults

    try:
        return EvaluationResults.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"The stored evaluation results could not be read: {exc}.", stacklevel=4)
        return None


def _build_score(name: str, config: dict[str, Any]) -> Any:
    from .scores import get_score

    return get_score(name, **config)


# --------------------------------------------------------------------------- the mixin
class HubMixin:
    """Checkpointing for :class:`~oodunleash.OODUnleash`: :meth:`save_pretrained`,
    :meth:`from_pretrained` and :meth:`push_to_hub`.

    Layer selections given as module *types* are recorded by qualified name for the model card;
    what is restored is the resolved list of ``layer_names`` (name globs round-trip unchanged).

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from oodunleash import OODUnleash
        >>> def make_net():
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))),
        ...                   batch_size=16)
        >>> unleashed = OODUnleash(make_net(), "umap").fit(data, epochs=1, loss_constraint=0.5,
        ...                                                progress=False)
        >>> folder = tempfile.mkdtemp()
        >>> _ = unleashed.save_pretrained(folder)
        >>> again = OODUnleash.from_pretrained(folder, model=make_net)
        >>> x = torch.randn(4, 1, 4, 4)
        >>> torch.equal(again.score(x), unleashed.score(x))
        True
        >>> unleashed.push_to_hub("me/unleashed-mlp")  # doctest: +SKIP
    """

    # Provided by OODUnleash.
    model: nn.Module
    masks_: LayerMasks | None

    # ------------------------------------------------------------------ save
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        keep_masks: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        base_model: str | None = None,
        datasets: Sequence[str] | None = None,
        license: str | None = None,  # noqa: A002 - the model card field's name
        card_data: Mapping[str, Any] | None = None,
        model_card: bool = True,
        repo_id: str | None = None,
    ) -> Path:
        """Write the unleashed checkpoint to a folder (created if needed).

        Under ``torchrun`` only rank 0 writes; the other ranks return the folder at once.

        Files of an earlier checkpoint in the folder are replaced; other files are left alone.

        Args:
            save_directory: The folder.
            keep_masks: UMAP only (ignored for UM). ``False`` (default) bakes the masks into the weights: the
                result is a plain sparse model. ``True`` also stores the mask scores, the mask
                as packed bits and the dense values of the pruned weights in
                ``oodunleash_masks.safetensors``, so that :meth:`from_pretrained` gives back a
                wrapper with trainable masks attached (``model.safetensors`` stays baked).
            model_kwargs: Constructor arguments of the model, recorded in the config: for timm,
                extra ``create_model`` arguments; for a custom model, what
                :meth:`from_pretrained` passes to the factory given as ``model=``.
            class_names: Names of the classes, in logit order (also timm's ``label_names``).
                Default: ``self.class_names`` when set.
            base_model: Hub id of the model this one was fine-tuned from, for the model card.
                Not guessed: timm fills ``pretrained_cfg["hf_hub_id"]`` whether or not
                pretrained weights were loaded, so a model trained from scratch would claim a
                base it never had.
            datasets: Hub ids of the training datasets, for the model card.
            license: License id for the model card.
            card_data: More model-card metadata entries; they override the generated ones.
            model_card: Write ``README.md``.
            repo_id: The repo the usage snippet of the model card names.

        Returns:
            The folder.

        Raises:
            NotFittedError: Before :meth:`fit`.
            ValueError: ``model_kwargs``, class names or a score configuration that is not
                JSON-serialisable, or ``class_names`` of the wrong length.
        """
        self._check_fitted("save_pretrained()")
        folder = Path(save_directory).expanduser()
        if not is_main_process():  # under torchrun every rank holds the same model: rank 0 writes
            return folder
        model = self.model
        num_outputs = self._num_outputs(model)
        names = class_names if class_names is not None else getattr(self, "class_names", None)
        if names is not None:
            names = [str(n) for n in names]
            if num_outputs is not None and len(names) != num_outputs:
                raise ValueError(
                    f"class_names has {len(names)} entries but the model has {num_outputs} classes."
                )
        extra_args = _check_jsonable(dict(model_kwargs or {}), "model_kwargs")
        architecture = _timm_architecture(model)

        blobs: dict[str, bytes] = {}
        weights = self._baked_state_dict()
        blobs[WEIGHTS_NAME] = _save_safetensors(weights, metadata={"format": "pt"})
        model_info: dict[str, Any] = {
            "class": _qualname(_original_class(model)),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_classes": num_outputs,
        }
        timm_config = None
        if architecture is not None:
            timm_args = _timm_model_args(model, extra_args)
            timm_config = _timm_hub_config(model, architecture, timm_args, names)
            model_info.update(source="timm", architecture=architecture, model_args=timm_args)
            blobs[TIMM_CONFIG_NAME] = json.dumps(timm_config, indent=2).encode()
        else:
            model_info.update(source="custom", architecture=None, model_args=extra_args)

        scores_config, score_tensors = self._fitted_scores_for_saving()
        if score_tensors:
            blobs[SCORES_NAME] = _save_safetensors(score_tensors, metadata={"format": "pt"})

        masks_config = self._masks_for_saving(weights, keep_masks, blobs)

        results = getattr(self, "last_results_", None)
        results_dict = (
            _check_jsonable(results.to_dict(), "last_results_.to_dict()")
            if results is not None
            else None
        )
        train_config = getattr(self, "train_config_", None)
        config: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "oodunleash_version": _version(),
            "method": self.method,
            "loss_constraint": (
                None if self.loss_constraint_ is None else float(self.loss_constraint_)
            ),
            "keep_ratio": self.keep_ratio,
            "mask_mode": self.mask_mode,
            "mask_init": self.mask_init,
            "constraint": self.constraint,
            "constraint_factor": self.constraint_factor,
            "constraint_keep_ratio": self.constraint_keep_ratio,
            "seed": self.seed,
            "default_score": self.default_score,
            "head": getattr(self, "head", None),
            "feature_layer": getattr(self, "feature_layer", None),
            "layers": _describe_selector(self.layers),
            "exclude": _describe_selector(self.exclude),
            "layer_names": list(self.layer_names),
            "masks": masks_config,
            "model": model_info,
            "class_names": names,
            "training": {
                "config": train_config.to_dict() if train_config is not None else None,
                "history": _jsonable(getattr(self, "history_", None)),
            },
            "scores": scores_config,
            "results": results_dict,
        }
        config["training"] = _check_jsonable(config["training"], "the training record")
        config["files"] = {
            name: {"sha256": _sha256(data), "size": len(data)} for name, data in blobs.items()
        }
        config["files"][CONFIG_NAME] = {}
        blobs[CONFIG_NAME] = json.dumps(config, indent=2).encode()
        if model_card:
            card = self._model_card(
                config,
                timm_config,
                repo_id=repo_id,
                base_model=base_model,
                datasets=datasets,
                license=license,
                card_data=card_data,
            )
            blobs[MODEL_CARD_NAME] = card.encode()

        # Everything is serialised and validated before the folder is touched. Tensor files are
        # written first, the config (with their hashes) last: an interrupted save leaves a
        # config whose hashes do not match, which loading reports, never a silent mix.
        folder.mkdir(parents=True, exist_ok=True)
        for name in _CHECKPOINT_FILES:
            if name not in blobs:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()  # stale file of an earlier, different checkpoint
        for name in sorted(blobs, key=lambda n: n == CONFIG_NAME):
            write_atomic(folder / name, blobs[name])
        return folder

    @staticmethod
    def _num_outputs(model: nn.Module) -> int | None:
        value = getattr(model, "num_classes", None)
        if isinstance(value, int):
            return value
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else None

    def _baked_state_dict(self) -> dict[str, Tensor]:
        state = self.model.state_dict()  # reads the raw parameters, also while masks are attached
        masks = self.masks_
        if masks is not None:
            for name in masks.layer_names:
                key = f"{name}.weight" if name else "weight"
                weight = state[key]
                state[key] = weight * masks.mask(name, exact=True).to(weight.device, weight.dtype)
        return _tensors_for_saving(state, "The model's state_dict")

    def _fitted_scores_for_saving(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        configs: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        for key, score in (getattr(self, "fitted_scores_", None) or {}).items():
            if "/" in key:
                raise ValueError(f"Fitted score names may not contain '/': {key!r}.")
            state = _tensors_for_saving(score.state_dict(), f"The {key!r} score's state")
            configs[key] = {
                "name": getattr(score, "name", key),
                "class": _qualname(type(score)),
                "config": _check_jsonable(score.get_config(), f"The {key!r} score's config"),
                "tensors": sorted(state),
            }
            tensors.update({f"{key}/{k}": v for k, v in state.items()})
        return configs, tensors

    def _masks_for_saving(
        self, baked: dict[str, Tensor], keep_masks: bool, blobs: dict[str, bytes]
    ) -> dict[str, Any] | None:
        masks = self.masks_
        if masks is None:
            if keep_masks and self.method == "umap":
                raise ValueError(
                    "keep_masks=True needs the learnt masks, but this UMAP wrapper has none "
                    "(it was loaded from a baked checkpoint)."
                )
            return None
        zeros = total = 0
        for name in masks.layer_names:
            w = baked[f"{name}.weight" if name else "weight"]
            zeros += int((w == 0).sum())
            total += w.numel()
        info: dict[str, Any] = {
            "storage": "scores" if keep_masks else "baked",
            "sparsity": zeros / max(total, 1),
        }
        if keep_masks:
            tensors: dict[str, Tensor] = {}
            state = self.model.state_dict()
            for name in masks.layer_names:
                keep = masks.mask(name, exact=True).detach().cpu().bool()
                dense = state[f"{name}.weight" if name else "weight"].detach().cpu()
                tensors[f"{name}/scores"] = masks.layer_scores(name).detach().cpu().contiguous()
                tensors[f"{name}/mask"] = pack_bits(keep)
                # Only the pruned values: the kept ones are already in model.safetensors.
                tensors[f"{name}/pruned"] = dense[~keep].contiguous()
            blobs[MASKS_NAME] = _save_safetensors(tensors, metadata={"format": "pt"})
            info["shapes"] = {
                name: list(masks.layer_scores(name).shape) for name in masks.layer_names
            }
        return info

    # ------------------------------------------------------------------ model card
    def _model_card(
        self,
        config: dict[str, Any],
        timm_config: dict[str, Any] | None,
        *,
        repo_id: str | None,
        base_model: str | None,
        datasets: Sequence[str] | None,
        license: str | None,  # noqa: A002
        card_data: Mapping[str, Any] | None,
    ) -> str:
        from huggingface_hub import ModelCardData

        model_info = config["model"]
        is_timm = timm_config is not None
        results = getattr(self, "last_results_", None)
        tags = ["ood-detection", "unleashing-mask", "oodunleash", self.method]
        if is_timm:
            tags.append("timm")
        metadata: dict[str, Any] = {
            "library_name": "oodunleash",
            "pipeline_tag": "image-classification",
            "tags": tags,
        }
        if base_model:
            metadata["base_model"] = base_model
        if datasets:
            metadata["datasets"] = list(datasets)
        if license:
            metadata["license"] = license
        if results is not None:
            metadata["metrics"] = ["auroc", "aupr_in", "aupr_out", "fpr95", "accuracy"]
        metadata.update(dict(card_data or {}))
        yaml_text = ModelCardData(**metadata).to_yaml()

        repo = repo_id or "<repo_id>"
        arch = model_info.get("architecture") or model_info["class"]
        title = repo_id.split("/")[-1] if repo_id else f"Unleashed {arch}"
        method_name = {"um": "UM (weights fine-tuned)", "umap": "UMAP (pruning mask learnt)"}
        history = config["training"]["history"] or []
        train_cfg = config["training"]["config"] or {}
        rows = [
            ("Architecture", f"`{arch}`" + (" (timm)" if is_timm else " (custom)")),
            ("Method", method_name.get(self.method, self.method)),
            (
                "Loss constraint ξ",
                "none (plain cross-entropy control)"
                if config["loss_constraint"] is None
                else f"{config['loss_constraint']:.4g}",
            ),
            ("Masked layers", f"{len(self.layer_names)}"),
            ("Default OOD score", f"`{self.default_score}`"),
        ]
        if self.method == "umap":
            rows.insert(3, ("Keep ratio", f"{self.keep_ratio:g} ({self.mask_mode}-wise)"))
        if config["masks"] is not None:
            rows.append(("Sparsity of masked layers", f"{config['masks']['sparsity']:.1%}"))
        if train_cfg:
            rows.append(
                (
                    "Fine-tune",
                    f"{train_cfg.get('epochs')} epochs, {train_cfg.get('optimizer')}, "
                    f"lr {train_cfg.get('lr')}, {train_cfg.get('schedule')} schedule",
                )
            )
        if history and "accuracy" in history[-1]:
            rows.append(("Final train accuracy", f"{history[-1]['accuracy']:.2%}"))
        if config["scores"]:
            rows.append(("Fitted scores", ", ".join(f"`{k}`" for k in config["scores"])))
        if config["class_names"]:
            shown = ", ".join(config["class_names"][:20])
            more = len(config["class_names"]) - 20
            rows.append(("Classes", shown + (f" (+{more} more)" if more > 0 else "")))
        rows.append(("oodunleash", config["oodunleash_version"]))
        table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])

        results_md = (
            results.to_markdown().strip()
            if results is not None
            else "No evaluation was recorded before saving."
        )
        if is_timm:
            load = f'unleashed = OODUnleash.from_pretrained("{repo}")'
        else:
            load = (
                f"# {model_info['class']} is a custom architecture: pass it in.\n"
                f'unleashed = OODUnleash.from_pretrained("{repo}", model=MyNet)'
            )
        usage = (
            "```python\n"
            "from oodunleash import OODUnleash\n\n"
            f"{load}\n"
            "# images: a preprocessed batch, shaped (N, C, H, W) as in training\n"
            f"scores = unleashed.score(images)  # {self.default_score}; higher = more "
            "in-distribution\n"
            "```\n"
        )
        if is_timm:
            usage += (
                "\nThe repo is also a plain timm checkpoint (no oodunleash needed):\n\n"
                "```python\n"
                "import timm\n\n"
                f'model = timm.create_model("hf-hub:{repo}", pretrained=True)\n'
                "```\n"
            )
        files = [f"- `{name}`" for name in config["files"]]
        return (
            f"---\n{yaml_text}\n---\n\n"
            f"# {title}\n\n"
            f"An image classifier fine-tuned with **Unleashing Mask** ({self.method.upper()}; "
            "Zhu et al., ICML 2023) to restore its out-of-distribution (OOD) detection: the "
            "fine-tune keeps the ID training loss near the constraint ξ instead of driving it to "
            "zero, so the model forgets memorised atypical samples. Made with oodunleash.\n\n"
            "## Results\n\n"
            f"{results_md}\n\n"
            "## How it was made\n\n"
            f"{table}\n\n"
            "## Usage\n\n"
            f"{usage}\n"
            "## Files\n\n" + "\n".join(files) + "\n\n"
            "## Citation\n\n"
            "```bibtex\n"
            "@inproceedings{zhu2023unleashing,\n"
            "  title={Unleashing Mask: Explore the Intrinsic Out-of-Distribution Detection "
            "Capability},\n"
            "  author={Zhu, Jianing and Li, Hengzhuang and Yao, Jiangchao and Liu, Tongliang "
            "and Xu, Jianliang and Han, Bo},\n"
            "  booktitle={International Conference on Machine Learning},\n"
            "  year={2023}\n"
            "}\n"
            "```\n"
        )

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls: type[_Self],
        repo_id_or_path: str | os.PathLike[str],
        model: nn.Module | ModelFactory | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        device: torch.device | str | None = None,
        verify: bool = True,
    ) -> _Self:
        """Load an unleashed checkpoint from a folder or a Hub repo; ready to score without
        refitting (fitted scores included).

        Args:
            repo_id_or_path: A folder written by :meth:`save_pretrained`, or a Hub repo id.
            model: For a custom architecture (required): the module to load the weights into
                (modified in place), or a factory called with the ``model_kwargs`` recorded
                at save time. For a timm checkpoint: optional; by default the model is rebuilt
                with ``timm.create_model`` from the stored config.
            revision: Hub branch, tag or commit (default ``main``).
            token: Hub token for private or gated repos (default: the logged-in one).
            cache_dir: Hub cache folder.
            force_download: Download again even if cached.
            local_files_only: Use the Hub cache only, never the network.
            device: Move the model there.
            verify: Check every tensor file against the SHA-256 recorded at save time.

        Returns:
            A fitted :class:`~oodunleash.OODUnleash` (model in eval mode). With a
            ``keep_masks=True`` UMAP checkpoint its masks are attached and trainable.

        Raises:
            CheckpointNotFoundError: No such folder, repo, revision or file; not an oodunleash
                checkpoint.
            IncompatibleCheckpointError: Written by a newer major format version, or a timm
                architecture the installed timm does not know.
            CorruptCheckpointError: A truncated or altered file.
            CheckpointMismatchError: ``model`` does not fit the stored weights (the message
                names the keys).
            HubConnectionError: The Hub is unreachable and the cache has no complete copy.
            HubAuthError: The Hub refused the token.
            TypeError: A custom architecture and no ``model``.

        Example:
            >>> from oodunleash import OODUnleash
            >>> unleashed = OODUnleash.from_pretrained("me/resnet18-unleashed")  # doctest: +SKIP
        """
        source = os.fspath(repo_id_or_path)
        local = Path(source).expanduser()
        if local.is_dir():
            folder = local
            where = str(folder)
        elif local.exists():
            raise CheckpointNotFoundError(
                f"{source} is a file; pass the folder that save_pretrained() wrote."
            )
        elif _looks_like_path(source):
            raise CheckpointNotFoundError(f"No checkpoint folder {source}.")
        else:
            folder = _download_checkpoint(
                source,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
            )
            where = f"the Hub repo {source!r}"

        if not (folder / CONFIG_NAME).is_file():
            hint = (
                " It looks like a plain timm checkpoint: timm.create_model('local-dir:...')."
                if (folder / TIMM_CONFIG_NAME).is_file()
                else ""
            )
            raise CheckpointNotFoundError(
                f"{folder} has no {CONFIG_NAME}: it is not an oodunleash checkpoint.{hint}"
            )
        config = _read_json(folder / CONFIG_NAME)
        _check_format(config, where)
        _config_files(config)
        if verify:
            _verify_files(folder, config)
        return cls._from_folder(folder, config, model, where=where, device=device)

    @classmethod
    def _from_folder(
        cls: type[_Self],
        folder: Path,
        config: dict[str, Any],
        model: nn.Module | ModelFactory | None,
        *,
        where: str,
        device: torch.device | str | None,
    ) -> _Self:
        model_info = config.get("model") or {}
        if model is None:
            if model_info.get("source") == "timm" and (folder / TIMM_CONFIG_NAME).is_file():
                model = _build_timm_model(folder)
            else:
                raise TypeError(
                    f"The checkpoint in {where} holds a custom architecture "
                    f"({model_info.get('class')}). oodunleash never imports code from a "
                    "checkpoint: pass the model, e.g. from_pretrained(..., model=MyNet()) or a "
                    "factory model=MyNet (called with the recorded model_kwargs "
                    f"{model_info.get('model_args') or {}})."
                )
        elif not isinstance(model, nn.Module):
            if not callable(model):
                raise TypeError(
                    f"model must be an nn.Module or a factory returning one, got "
                    f"{type(model).__name__}."
                )
            model = model(**(model_info.get("model_args") or {}))
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"The model factory returned a {type(model).__name__}, not an nn.Module."
                )

        weights = _load_tensors(folder / WEIGHTS_NAME)
        _load_model_state(model, weights, where)
        if device is not None:
            model.to(device)

        layer_names = list(config.get("layer_names") or [])
        options = {
            "layers": layer_names or None,
            "keep_ratio": config.get("keep_ratio"),
            "mask_mode": config.get("mask_mode", "layer"),
            "mask_init": config.get("mask_init", "random"),
            "constraint": config.get("constraint", "relative"),
            "constraint_factor": config.get("constraint_factor", DEFAULT_CONSTRAINT_FACTOR),
            "constraint_keep_ratio": config.get("constraint_keep_ratio", 0.965),
            "score": config.get("default_score", "energy"),
            "seed": config.get("seed", 0),
            "head": config.get("head"),
            "feature_layer": config.get("feature_layer"),
        }
        accepted = inspect.signature(cls).parameters
        unleashed = cls(
            model,
            config["method"],
            **{k: v for k, v in options.items() if k in accepted and v is not None},
        )
        if layer_names and list(unleashed.layer_names) != layer_names:
            raise CheckpointMismatchError(
                f"The model's layers do not match the checkpoint's masked layers in {where}."
            )
        masks_info = config.get("masks") or {}
        if masks_info.get("storage") == "scores":
            unleashed.masks_ = _restore_masks(unleashed, folder, masks_info, where)

        xi = config["loss_constraint"]
        unleashed.loss_constraint_ = None if xi is None else float(xi)
        training = config.get("training") or {}
        unleashed.history_ = list(training.get("history") or [])
        train_config = _restore_train_config(training.get("config"))
        if train_config is not None:
            unleashed.train_config_ = train_config
        if config.get("class_names") is not None:
            unleashed.class_names = list(config["class_names"])
        unleashed.hub_config_ = config

        scores = config.get("scores") or {}
        if scores:
            unleashed.fitted_scores_ = _restore_scores(folder, scores, where)
        if config.get("results") is not None:
            unleashed.last_results_ = _restore_results(config["results"])
        model.eval()
        return unleashed

    # ------------------------------------------------------------------ push
    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool = False,
        save_directory: str | os.PathLike[str] | None = None,
        **save_kwargs: Any,
    ) -> CommitInfo | None:
        """Save the checkpoint and upload it to a Hub model repo in one commit.

        Under ``torchrun`` only rank 0 uploads; the other ranks return ``None``.

        The repo is created when missing. Files of an earlier oodunleash checkpoint that this
        one does not have (e.g. ``oodunleash_masks.safetensors``) are deleted in the same commit.

        Args:
            repo_id: ``"user/name"`` (or ``"name"`` for the token's user).
            token: A write token (default: the logged-in one, or ``HF_TOKEN``).
            private: Create the repo private (ignored when it exists).
            revision: The branch to push to (created from ``main`` when missing). With
                ``create_pr``, the branch the pull request targets.
            commit_message, commit_description: Of the commit.
            create_pr: Open a pull request instead of pushing to the branch.
            save_directory: Where to write the checkpoint before uploading (kept). Default: a
                temporary folder, deleted after a successful upload and kept after a failure.
            **save_kwargs: Passed to :meth:`save_pretrained` (``keep_masks``, ``model_kwargs``,
                ``class_names``, ``base_model``, ``datasets``, ``license``, ``card_data``,
                ``model_card``).

        Returns:
            The ``huggingface_hub`` ``CommitInfo`` (``.oid``, ``.pr_url``...).

        Raises:
            HubAuthError: No token, or the Hub refused it (before or during the upload).
            HubConnectionError: The upload failed on the way; ``error.local_copy`` is the folder
                holding the complete checkpoint, ready to retry.
            HubError: Another refusal by the Hub (message from the Hub), with ``local_copy``.

        Example:
            >>> unleashed.push_to_hub("me/resnet18-unleashed", private=True)  # doctest: +SKIP
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(token, str) or not token:
            token = get_token() if token is None else None
        if not token:
            raise HubAuthError(
                "push_to_hub needs a Hugging Face token with write access: log in with "
                "`hf auth login`, set HF_TOKEN, or pass token=... . Nothing was uploaded."
            )
        if not is_main_process():  # one upload per job, from rank 0
            return None
        keep_folder = save_directory is not None
        folder = (
            Path(save_directory).expanduser()
            if keep_folder
            else Path(tempfile.mkdtemp(prefix="oodunleash-push-"))
        )
        try:
            self.save_pretrained(folder, repo_id=repo_id, **save_kwargs)
        except BaseException:
            if not keep_folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise

        api = HfApi(token=token, library_name="oodunleash", library_version=_version())
        target = f"{repo_id!r}" + (f" ({revision})" if revision else "")
        try:
            create_kwargs: dict[str, Any] = {"exist_ok": True}
            if private is not None:
                create_kwargs["private"] = private
            repo_id = api.create_repo(repo_id, **create_kwargs).repo_id
            if revision is not None and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            local = [n for n in (*_CHECKPOINT_FILES, MODEL_CARD_NAME) if (folder / n).is_file()]
            remote = set(api.list_repo_files(repo_id, revision=revision))
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                for name in local
            ]
            operations += [
                CommitOperationDelete(path_in_repo=name)
                for name in _CHECKPOINT_FILES
                if name in remote and name not in local
            ]
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload unleashed model ({self.method.upper()})",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        except Exception as exc:
            raise _push_error(exc, target, folder, HfHubHTTPError) from exc
        if not keep_folder:
            shutil.rmtree(folder, ignore_errors=True)
        return info


def _push_error(exc: Exception, target: str, folder: Path, http_error: type) -> HubError:
    kept = (
        f" The complete checkpoint is kept in {folder}: retry with "
        f"huggingface_hub.upload_folder(repo_id=..., folder_path={str(folder)!r}), or load it "
        "with OODUnleash.from_pretrained(that folder)."
    )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    error: HubError
    if isinstance(exc, http_error) and status in (401, 403):
        error = HubAuthError(
            f"The Hub refused to let this token write to {target} (HTTP {status}): use a token "
            f"with write access to that namespace.{kept}"
        )
    elif (isinstance(exc, http_error) and (status is None or status >= 500)) or (
        _is_transport_error(exc)
    ):
        error = HubConnectionError(
            f"Uploading to {target} failed: {type(exc).__name__}: {exc}.{kept}"
        )
    else:
        error = HubError(f"The Hub refused the upload to {target}: {exc}.{kept}")
    error.local_copy = folder
    return error


def _restore_masks(unleashed: Any, folder: Path, info: dict, where: str) -> LayerMasks:
    if not (folder / MASKS_NAME).is_file():
        raise CheckpointNotFoundError(f"The checkpoint in {where} lacks {MASKS_NAME}.")
    grouped = _split_prefixed(_load_tensors(folder / MASKS_NAME))
    model = unleashed.model
    masks = LayerMasks(
        model,
        unleashed.layer_names,
        keep_ratio=unleashed.keep_ratio,
        mode=unleashed.mask_mode,
        init=unleashed.mask_init,
        seed=unleashed.seed,
    )
    missing = [n for n in masks.layer_names if n not in grouped]
    if missing:
        raise CorruptCheckpointError(f"{MASKS_NAME} in {where} lacks the layers {missing}.")
    with torch.no_grad():
        for name in masks.layer_names:
            parts = grouped[name]
            weight = model.get_submodule(name)._parameters["weight"]
            scores = masks.layer_scores(name)
            if tuple(parts["scores"].shape) != tuple(scores.shape):
                raise CheckpointMismatchError(
                    f"Mask scores of layer {name!r} have shape {tuple(parts['scores'].shape)}, "
                    f"the layer {tuple(scores.shape)}."
                )
            keep = unpack_bits(parts["mask"], weight.shape).to(weight.device)
            pruned = parts["pruned"]
            if pruned.numel() != int((~keep).sum()):
                raise CorruptCheckpointError(
                    f"{MASKS_NAME}: layer {name!r} stores {pruned.numel()} pruned values for "
                    f"{int((~keep).sum())} pruned weights."
                )
            weight[~keep] = pruned.to(weight.device, weight.dtype)
            scores.copy_(parts["scores"].to(scores.device, scores.dtype))
    for name in masks.layer_names:
        stored = unpack_bits(grouped[name]["mask"], masks.layer_scores(name).shape)
        if masks.mode == "layer":
            recomputed = topk_mask(masks.layer_scores(name), masks.keep_ratio).bool().cpu()
        else:
            recomputed = masks.mask(name, exact=True).bool().cpu()
        if not torch.equal(recomputed, stored):
            raise CorruptCheckpointError(
                f"The stored mask scores of layer {name!r} do not reproduce the stored mask in "
                f"{where}: {MASKS_NAME} is damaged."
            )
    return masks.attach()


def _restore_scores(folder: Path, scores: dict[str, Any], where: str) -> dict[str, Any]:
    path = folder / SCORES_NAME
    grouped = _split_prefixed(_load_tensors(path)) if path.is_file() else {}
    restored: dict[str, Any] = {}
    for key, entry in scores.items():
        state = grouped.get(key, {})
        wanted = set(entry.get("tensors") or [])
        if wanted != set(state):
            raise CorruptCheckpointError(
                f"{SCORES_NAME} in {where}: score {key!r} should hold {sorted(wanted)}, holds "
                f"{sorted(state)}."
            )
        try:
            score = _build_score(entry.get("name", key), dict(entry.get("config") or {}))
        except (ValueError, TypeError) as exc:
            raise IncompatibleCheckpointError(
                f"The checkpoint in {where} has a fitted {key!r} score this oodunleash cannot "
                f"rebuild ({exc}). Register it with oodunleash.scores.register_score before "
                "loading."
            ) from exc
        score.load_state_dict(state)
        restored[key] = score
    return restored
