"""``save_checkpoint``: serialise everything, validate it, then write the folder as a whole."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .._modules import unwrap_compiled
from ..distributed import is_main_process
from .card import model_card as render_model_card
from .fitted_scores import scores_for_saving
from .folder import write_folder
from .format import (
    CHECKPOINT_FILES,
    CONFIG_NAME,
    FORMAT_VERSION,
    MASKS_NAME,
    MODEL_CARD_NAME,
    SCORES_NAME,
    TIMM_CONFIG_NAME,
    WEIGHTS_NAME,
    check_json,
    dump_json,
    package_version,
    read_json,
    sha256_bytes,
    sha256_file,
)
from .masks import baked_state_dict, masks_for_saving, plain_layer_name
from .state import WrapperState
from .tensors import safetensors_bytes
from .timm_config import (
    recorded_preprocessing,
    resolve_preprocessing,
    timm_architecture,
    write_timm_config,
)

__all__ = ["save_checkpoint"]


def _num_outputs(model: nn.Module) -> int | None:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _describe_selector(selector: Any) -> Any:
    """Layer selectors as JSON: globs stay strings, module types become qualified names."""
    if selector is None:
        return None
    items = [selector] if isinstance(selector, str | type) else list(selector)
    return [
        item if isinstance(item, str) else {"type": f"{item.__module__}.{item.__qualname__}"}
        for item in items
    ]


def owned_files(folder: Path) -> set[str]:
    """The entries of ``folder`` that an earlier save wrote: the files its config lists, and
    the model card while it is as written (a card edited by hand is the user's)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return set()
    try:
        config = read_json(config_path)
    except Exception:  # a damaged config proves nothing: every file is then the user's
        return set()
    if "format_version" not in config or not isinstance(config.get("files"), dict):
        return set()
    ours = {CONFIG_NAME} | {n for n in config["files"] if n in CHECKPOINT_FILES}
    card = folder / MODEL_CARD_NAME
    if card.is_file():
        recorded = config.get("card_sha256")
        if recorded is None and str(config["format_version"]).startswith("1."):
            # Format 1 did not record the card; it always wrote one with this tag.
            if "library_name: oodunleash" in card.read_text(encoding="utf-8", errors="replace"):
                ours.add(MODEL_CARD_NAME)
        elif recorded == sha256_file(card):
            ours.add(MODEL_CARD_NAME)
    return ours


def _timm_files(
    model: nn.Module,
    architecture: str,
    extra_args: dict[str, Any],
    class_names: list[str] | None,
    preprocessing: dict[str, Any] | None,
    keep_source: bool,
) -> tuple[bytes, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="oodunleash-timm-") as scratch:
        path = Path(scratch) / TIMM_CONFIG_NAME
        config = write_timm_config(
            model, path, extra_args, class_names, preprocessing, keep_source=keep_source
        )
        return path.read_bytes(), config


def _model_info(model: nn.Module, num_outputs: int | None) -> dict[str, Any]:
    cls = getattr(type(model), "_oodunleash_original_class", type(model))
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": num_outputs,
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
    num_outputs = _num_outputs(model)
    names = None if state.class_names is None else [str(n) for n in state.class_names]
    if names is not None and num_outputs is not None and len(names) != num_outputs:
        raise ValueError(
            f"class_names has {len(names)} entries but the model has {num_outputs} classes."
        )
    if keep_masks and state.params.get("method") == "umap" and state.masks is None:
        raise ValueError(
            "keep_masks=True needs the learnt masks, but this UMAP wrapper has none (it was "
            "loaded from a baked checkpoint, or not fitted)."
        )
    extra_args = check_json(dict(model_kwargs or {}), "model_kwargs")
    explicit = {"input_size": input_size, "mean": mean, "std": std}
    explicit |= {"interpolation": interpolation, "crop_pct": crop_pct}
    preprocessing = resolve_preprocessing(explicit, data_config)

    files: dict[str, bytes] = {}
    weights = baked_state_dict(model, state.masks)
    files[WEIGHTS_NAME] = safetensors_bytes(weights)
    model_info = _model_info(model, num_outputs)
    architecture = timm_architecture(model)
    if architecture is not None:
        if preprocessing is None and base_model is None:
            warnings.warn(
                "save_pretrained: the preprocessing the model was trained with is not recorded, "
                "so timm will assume its defaults (224 px, ImageNet mean/std) for it. Pass "
                "input_size=, mean=, std= (or data_config=), or base_model= when the model "
                "keeps the preprocessing of the pretrained weights it was fine-tuned from.",
                UserWarning,
                stacklevel=3,
            )
        keep_source = preprocessing is None and base_model is not None
        files[TIMM_CONFIG_NAME], timm_config = _timm_files(
            model, architecture, extra_args, names, preprocessing, keep_source
        )
        if preprocessing is not None or keep_source:
            preprocessing = recorded_preprocessing(timm_config)
        model_info |= {"source": "timm", "architecture": architecture}
        model_info["model_args"] = timm_config.get("model_args", {})
    else:
        model_info |= {"source": "custom", "architecture": None, "model_args": extra_args}

    score_configs, score_tensors = scores_for_saving(state.fitted_scores)
    if score_tensors:
        files[SCORES_NAME] = safetensors_bytes(score_tensors)
    masks_info, mask_tensors = masks_for_saving(model, state.masks, weights, keep_masks)
    if mask_tensors:
        files[MASKS_NAME] = safetensors_bytes(mask_tensors)

    results = state.results
    params = dict(state.params)
    for key in ("layers", "exclude"):  # module types become names; layer_names round-trips
        if key in params:
            params[key] = _describe_selector(params[key])
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "oodunleash_version": package_version(),
        "params": check_json(params, "The wrapper's parameters (get_params())"),
        "layer_names": [plain_layer_name(n) for n in state.layer_names],
        "fitted": bool(state.fitted),
        "loss_constraint": None if state.loss_constraint is None else float(state.loss_constraint),
        "training": check_json(
            {
                "config": None if state.train_config is None else state.train_config.to_dict(),
                "history": list(state.history or []),
            },
            "The training record",
        ),
        "masks": masks_info,
        "model": model_info,
        "class_names": names,
        "preprocessing": preprocessing,
        "scores": score_configs,
        "results": None if results is None else check_json(results.to_dict(), "last_results_"),
    }
    config["files"] = {n: {"sha256": sha256_bytes(d), "size": len(d)} for n, d in files.items()}
    config["files"][CONFIG_NAME] = {}
    config["card_sha256"] = None
    if model_card:
        card = render_model_card(
            config,
            None if results is None else results.to_markdown().strip(),
            is_timm=architecture is not None,
            repo_id=repo_id,
            base_model=base_model,
            datasets=datasets,
            license=license,
            card_data=card_data,
        )
        files[MODEL_CARD_NAME] = card.encode()
        config["card_sha256"] = sha256_bytes(files[MODEL_CARD_NAME])
    files[CONFIG_NAME] = dump_json(config)
    write_folder(folder, files, owned_files(folder), overwrite=overwrite)
    return folder
