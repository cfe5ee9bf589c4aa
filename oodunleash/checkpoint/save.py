"""``save_checkpoint``: serialise everything, validate it, then write the folder as a whole."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from oodunleash.checkpoint import format as layout
from oodunleash.checkpoint.calibration import calibration_for_saving
from oodunleash.checkpoint.card import model_card as render_model_card
from oodunleash.checkpoint.consistency import field_digests, num_outputs
from oodunleash.checkpoint.fitted_scores import scores_for_saving
from oodunleash.checkpoint.folder import write_folder
from oodunleash.checkpoint.format import check_json, owned_files, sha256_bytes
from oodunleash.checkpoint.masks import baked_state_dict, masks_for_saving, plain_layer_name
from oodunleash.checkpoint.state import WrapperState
from oodunleash.checkpoint.tensors import safetensors_bytes
from oodunleash.checkpoint.timm_config import (
    recorded_preprocessing,
    resolve_preprocessing,
    timm_architecture,
    timm_config_file,
)
from oodunleash.config import explicit_constraint
from oodunleash.runtime.distributed import is_main_process
from oodunleash.runtime.modules import unwrap_compiled

__all__ = ["save_checkpoint"]


def _describe_selector(selector: Any) -> Any:
    """Layer selectors as JSON: globs stay strings, module types become qualified names."""
    if selector is None:
        return None
    items = [selector] if isinstance(selector, str | type) else list(selector)
    return [
        item if isinstance(item, str) else {"type": f"{item.__module__}.{item.__qualname__}"}
        for item in items
    ]


def _check_state(model: nn.Module, state: WrapperState, keep_masks: bool) -> list[str] | None:
    """The class names as strings, after refusing a state that cannot be saved as asked."""
    classes = num_outputs(model)
    names = None if state.class_names is None else [str(n) for n in state.class_names]
    if names is not None and classes is not None and len(names) != classes:
        raise ValueError(
            f"class_names has {len(names)} entries but the model has {classes} classes."
        )
    if keep_masks and state.params.get("method") == "umap" and state.masks is None:
        raise ValueError(
            "keep_masks=True needs the learnt masks, but this UMAP wrapper has none (it was "
            "loaded from a baked checkpoint, or not fitted)."
        )
    return names


def _describe_model(
    model: nn.Module,
    extra_args: dict[str, Any],
    names: list[str] | None,
    preprocessing: dict[str, Any] | None,
    base_model: str | None,
) -> tuple[dict[str, Any], bytes | None, dict[str, Any] | None]:
    """The config's ``model`` entry, timm's ``config.json`` (timm models only) and the
    preprocessing as recorded."""
    cls = getattr(type(model), "_oodunleash_original_class", type(model))
    info: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": num_outputs(model),
    }
    architecture = timm_architecture(model)
    if architecture is None:
        info |= {"source": "custom", "architecture": None, "model_args": extra_args}
        return info, None, preprocessing
    if preprocessing is None and base_model is None:
        warnings.warn(
            "save_pretrained: the preprocessing the model was trained with is not recorded, so "
            "timm will assume its defaults (224 px, ImageNet mean/std) for it. Pass "
            "input_size=, mean=, std= (or data_config=), or base_model= when the model keeps "
            "the preprocessing of the pretrained weights it was fine-tuned from.",
            UserWarning,
            stacklevel=4,
        )
    keep_source = preprocessing is None and base_model is not None
    data, timm_config = timm_config_file(
        model, extra_args, names, preprocessing, keep_source=keep_source
    )
    if preprocessing is not None or keep_source:
        preprocessing = recorded_preprocessing(timm_config)
    info |= {"source": "timm", "architecture": architecture}
    info["model_args"] = timm_config.get("model_args", {})
    return info, data, preprocessing


def _wrapper_record(state: WrapperState) -> dict[str, Any]:
    """The config's fields that describe the wrapper (parameters and what ``fit`` learnt)."""
    params = dict(state.params)
    for key in ("layers", "exclude"):  # module types become names; layer_names round-trips
        if key in params:
            params[key] = _describe_selector(params[key])
    if "constraint" in params:  # "relative" would read as whatever a later default is
        params["constraint"] = explicit_constraint(params["constraint"])
    train_config = None if state.train_config is None else state.train_config.to_dict()
    results = state.results
    return {
        "params": check_json(params, "The wrapper's parameters (get_params())"),
        "layer_names": [plain_layer_name(n) for n in state.layer_names],
        "fitted": bool(state.fitted),
        "loss_constraint": None if state.loss_constraint is None else float(state.loss_constraint),
        "training": check_json(
            {"config": train_config, "history": list(state.history or [])}, "The training record"
        ),
        "results": None if results is None else check_json(results.to_dict(), "last_results_"),
    }


def save_checkpoint(
    save_directory: str | os.PathLike[str],
    model: nn.Module,
    state: WrapperState,
    *,
    keep_masks: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    data_config: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,  # noqa: A002 - the model card field's name
    card_data: Mapping[str, Any] | None = None,
    model_card: bool = True,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder for ``model`` and a wrapper's ``state``, atomically.

    Args:
        save_directory: The folder (created if needed). A folder holding files oodunleash did
            not write keeps them; one whose ``README.md``, ``config.json``... oodunleash did not
            write is refused unless ``overwrite=True``; one holding sub-folders is refused.
        model: The (possibly ``torch.compile``'d) model; its plain module is saved.
        state: The wrapper's parameters and fitted state.
        keep_masks: UMAP: also store the mask scores, bits and pruned values
            (``oodunleash_masks.safetensors``) so the loaded wrapper can go on training.
        model_kwargs: Constructor arguments of the model (timm: extra ``create_model``
            arguments; custom: what the factory given to ``from_pretrained`` is called with).
        input_size, mean, std, interpolation, crop_pct: The preprocessing the model was
            trained with, written where ``timm.data.resolve_data_config`` finds it.
        data_config: The timm data config used in training (``resolve_data_config(...)``); its
            preprocessing entries are recorded, the explicit arguments above win.
        base_model: Hub id of the model fine-tuned from (model card). For a timm model saved
            without preprocessing, the source's preprocessing is kept only when this is given.
        datasets, license, card_data: Model card metadata (``card_data`` wins).
        model_card: Write ``README.md``.
        repo_id: The repo the model card's snippet names.
        overwrite: Replace files with checkpoint names that oodunleash did not write.

    Returns:
        The folder.
    """
    folder = Path(save_directory).expanduser()
    if not is_main_process():  # under torchrun every rank holds the same model: rank 0 writes
        return folder
    model = unwrap_compiled(model)
    names = _check_state(model, state, keep_masks)
    extra_args = check_json(dict(model_kwargs or {}), "model_kwargs")
    explicit = {"input_size": input_size, "mean": mean, "std": std}
    explicit |= {"interpolation": interpolation, "crop_pct": crop_pct}
    preprocessing = resolve_preprocessing(explicit, data_config)

    files: dict[str, bytes] = {}
    weights = baked_state_dict(model, state.masks)
    files[layout.WEIGHTS_NAME] = safetensors_bytes(weights)
    model_info, timm_file, preprocessing = _describe_model(
        model, extra_args, names, preprocessing, base_model
    )
    if timm_file is not None:
        files[layout.TIMM_CONFIG_NAME] = timm_file
    score_configs, score_tensors = scores_for_saving(state.fitted_scores)
    if score_tensors:
        files[layout.SCORES_NAME] = safetensors_bytes(score_tensors)
    masks_info, mask_tensors = masks_for_saving(model, state.masks, weights, keep_masks)
    if mask_tensors:
        files[layout.MASKS_NAME] = safetensors_bytes(mask_tensors)
    calibration_info, calibration_tensors = calibration_for_saving(state.calibration)
    if calibration_tensors:
        files[layout.CALIBRATION_NAME] = safetensors_bytes(calibration_tensors)

    config: dict[str, Any] = {
        "format_version": layout.FORMAT_VERSION,
        "oodunleash_version": layout.package_version(),
        **_wrapper_record(state),
        "masks": masks_info,
        "model": model_info,
        "class_names": names,
        "preprocessing": preprocessing,
        "scores": score_configs,
        "calibration": calibration_info,
        "files": {n: {"sha256": sha256_bytes(d), "size": len(d)} for n, d in files.items()},
        "card_sha256": None,
    }
    config["files"][layout.CONFIG_NAME] = {}
    if model_card:
        results = state.results
        card = render_model_card(
            config,
            None if results is None else results.to_markdown().strip(),
            is_timm=timm_file is not None,
            repo_id=repo_id,
            base_model=base_model,
            datasets=datasets,
            license=license,
            card_data=card_data,
        )
        files[layout.MODEL_CARD_NAME] = card.encode()
        config["card_sha256"] = sha256_bytes(files[layout.MODEL_CARD_NAME])
    config["field_sha256"] = field_digests(config)  # hand edits are refused on loading
    files[layout.CONFIG_NAME] = layout.dump_json(config)
    write_folder(folder, files, owned_files, overwrite=overwrite)
    return folder
