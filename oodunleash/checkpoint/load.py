"""``load_checkpoint``: find the folder (local or Hub), validate it, rebuild model and state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodunleash.checkpoint.calibration import restore_calibration
from oodunleash.checkpoint.consistency import check_config_fields, check_model_outputs
from oodunleash.checkpoint.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from oodunleash.checkpoint.fitted_scores import restore_scores
from oodunleash.checkpoint.folder import interrupted_backup
from oodunleash.checkpoint.format import (
    CONFIG_NAME,
    TIMM_CONFIG_NAME,
    WEIGHTS_NAME,
    format_major,
    listed_files,
    read_json,
    sha256_file,
)
from oodunleash.checkpoint.hub_io import download_checkpoint
from oodunleash.checkpoint.masks import restore_masks
from oodunleash.checkpoint.schema import upgrade_v1, validate_config
from oodunleash.checkpoint.state import (
    LoadedCheckpoint,
    WrapperState,
    results_from_json,
    train_config_from_json,
)
from oodunleash.checkpoint.tensors import load_model_state, load_tensors
from oodunleash.checkpoint.timm_config import build_timm_model
from oodunleash.masks.layer_masks import select_layers
from oodunleash.runtime.modules import unwrap_compiled

__all__ = ["load_checkpoint"]

ModelFactory = Callable[..., nn.Module]


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or os.path.isabs(text)
    )


def _locate(source: str, hub_options: dict[str, Any]) -> tuple[Path, str]:
    local = Path(source).expanduser()
    if local.is_dir():
        return local, str(local)
    if local.exists():
        raise CheckpointNotFoundError(
            f"{source} is a file; pass the folder that save_pretrained() wrote."
        )
    backup = interrupted_backup(local)
    if backup is not None:
        warnings.warn(
            f"A save to {local} was interrupted before it finished; loading the previous "
            f"checkpoint from {backup} (the next save to {local} restores it there).",
            UserWarning,
            stacklevel=4,
        )
        return backup, str(backup)
    if _looks_like_path(source):
        raise CheckpointNotFoundError(f"No checkpoint folder {source}.")
    return download_checkpoint(source, **hub_options), f"the Hub repo {source!r}"


def _verify_files(folder: Path, config: dict[str, Any]) -> None:
    for name, info in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"The checkpoint in {folder} is incomplete: {name} is missing."
            )
        expected = (info or {}).get("sha256")
        if expected and sha256_file(path) != expected:
            raise CorruptCheckpointError(
                f"{name} in {folder} does not match its recorded SHA-256 ({path.stat().st_size} "
                f"bytes on disk, {info.get('size')} written): the file is truncated or altered. "
                "Re-download it (force_download=True) or save the checkpoint again; pass "
                "verify=False to load it anyway."
            )


def _read_config(folder: Path, where: str, verify: bool) -> dict[str, Any]:
    if not (folder / CONFIG_NAME).is_file():
        hint = (
            " It looks like a plain timm checkpoint: timm.create_model('local-dir:...')."
            if (folder / TIMM_CONFIG_NAME).is_file()
            else ""
        )
        raise CheckpointNotFoundError(
            f"{folder} has no {CONFIG_NAME}: it is not an oodunleash checkpoint.{hint}"
        )
    config = read_json(folder / CONFIG_NAME)
    try:
        if format_major(config, where) == 1:
            config = upgrade_v1(config)
        validate_config(config, where)
        check_config_fields(config, where)
    except RecursionError as exc:  # nested just below the parser's limit, above a check's
        raise CorruptCheckpointError(
            f"{CONFIG_NAME} in {where} nests its JSON too deeply to read: oodunleash never "
            "writes such a file, so it was altered. Save the checkpoint again."
        ) from exc
    listed_files(config, where)
    if verify:
        _verify_files(folder, config)
    return config


def _build_model(
    folder: Path, config: dict[str, Any], model: nn.Module | ModelFactory | None, where: str
) -> nn.Module:
    info = config["model"]
    if model is None:
        if info["source"] == "timm" and (folder / TIMM_CONFIG_NAME).is_file():
            return build_timm_model(folder)
        raise TypeError(
            f"The checkpoint in {where} holds a custom architecture ({info['class']}). "
            "oodunleash never imports code from a checkpoint: pass the model, e.g. "
            "from_pretrained(..., model=MyNet()) or a factory model=MyNet (called with the "
            f"recorded model_kwargs {info.get('model_args') or {}})."
        )
    if isinstance(model, nn.Module):
        return model
    if not callable(model):
        raise TypeError(
            f"model must be an nn.Module or a factory returning one, got {type(model).__name__}."
        )
    built = model(**(info.get("model_args") or {}))
    if not isinstance(built, nn.Module):
        raise TypeError(f"The model factory returned a {type(built).__name__}, not an nn.Module.")
    return built


def _check_layers(model: nn.Module, layer_names: list[str], where: str) -> None:
    """The model has the checkpoint's masked layers, by name and in order."""
    if not layer_names:
        return
    try:
        found = list(select_layers(model, layer_names))
    except (ValueError, TypeError) as exc:
        raise CheckpointMismatchError(
            f"The model lacks the checkpoint's masked layers {layer_names} ({where}): {exc}"
        ) from exc
    if found != layer_names:
        raise CheckpointMismatchError(
            f"The model's layers {found} do not match the checkpoint's masked layers "
            f"{layer_names} ({where})."
        )


def load_checkpoint(
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
) -> LoadedCheckpoint:
    """Load a checkpoint folder or Hub repo: the model with its weights (in eval mode) and the
    wrapper's state; ``OODUnleash(loaded.model, **loaded.state.params)`` rebuilds the wrapper.

    See :meth:`oodunleash.OODUnleash.from_pretrained` for the arguments.
    """
    hub_options = {
        "revision": revision,
        "token": token,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
    }
    folder, where = _locate(os.fspath(repo_id_or_path), hub_options)
    config = _read_config(folder, where, verify)
    model = _build_model(folder, config, model, where)
    load_model_state(model, load_tensors(folder / WEIGHTS_NAME), where)
    check_model_outputs(model, config, where)
    if device is not None:
        model.to(device)
    plain = unwrap_compiled(model)
    layer_names = list(config["layer_names"])
    _check_layers(plain, layer_names, where)
    masks_info = config["masks"]
    masks = None
    if masks_info is not None and masks_info["storage"] == "scores":
        masks = restore_masks(plain, layer_names, masks_info, folder, where)
    params = dict(config["params"])
    params.pop("exclude", None)
    params["layers"] = layer_names or None
    xi = config["loss_constraint"]
    state = WrapperState(
        params=params,
        layer_names=layer_names,
        fitted=config["fitted"],
        loss_constraint=None if xi is None else float(xi),
        history=list(config["training"]["history"]),
        train_config=train_config_from_json(config["training"]["config"]),
        masks=masks,
        fitted_scores=restore_scores(folder, config["scores"], where),
        results=results_from_json(config["results"]),
        class_names=config["class_names"],
        preprocessing=config.get("preprocessing") or None,
        calibration=restore_calibration(folder, config.get("calibration"), where),
    )
    model.eval()
    return LoadedCheckpoint(model=model, state=state, config=config, where=where)
