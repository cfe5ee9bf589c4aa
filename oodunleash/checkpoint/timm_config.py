"""timm's own ``config.json``, written and read with timm's helpers, so that a checkpoint is a
plain timm checkpoint too and ``timm.data.resolve_data_config`` finds its preprocessing."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from oodunleash.checkpoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from oodunleash.checkpoint.format import TIMM_CONFIG_NAME, check_json, read_json
from oodunleash.decision.inputs import PREPROCESSING_ARGS, PREPROCESSING_KEYS, preprocessing_values

__all__ = [
    "record_known_preprocessing",
    "remember_preprocessing",
    "PREPROCESSING_KEYS",
    "build_timm_model",
    "timm_architecture",
    "timm_config_file",
]

#: The data-config entries a checkpoint records (what ``resolve_data_config`` reads).

# pretrained_cfg entries that describe the *source* weights (their tag, licence, paper, where
# they were downloaded from, the evaluation recipe of their training): never true of the
# unleashed checkpoint, which may have been trained from scratch at another size.
_SOURCE_KEYS = frozenset(
    {
        "tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description",
        "url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "label_offset",
        "test_input_size", "test_crop_pct", "test_pool_size",
    }
)  # fmt: skip
# create_model keyword arguments that load weights or code from elsewhere, or place the model:
# never taken from a downloaded config.
_UNSAFE_ARGS = frozenset(
    {
        "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
        "cache_dir", "pretrained_strict", "pretrained_filter_fn", "device", "dtype",
    }
)  # fmt: skip


def timm_architecture(model: nn.Module) -> str | None:
    """The registered timm architecture of ``model``, or ``None`` for any other model."""
    cls = getattr(type(model), "_oodunleash_original_class", type(model))
    if not cls.__module__.startswith("timm."):
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        return None
    import timm

    return architecture if timm.is_model(architecture) else None


def resolve_preprocessing(
    explicit: Mapping[str, Any], data_config: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The preprocessing to record: explicit arguments over the user's data config (only its
    preprocessing entries are read); ``None`` when neither says anything."""
    merged = preprocessing_values(explicit, data_config)
    if merged is None:
        return None
    return check_json(merged, "The preprocessing (input_size, mean, std, ...)")


def timm_config_file(
    model: nn.Module,
    extra_args: Mapping[str, Any],
    class_names: Sequence[str] | None,
    preprocessing: Mapping[str, Any] | None,
    *,
    keep_source: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """timm's ``config.json`` for ``model`` (written by timm's ``save_config_for_hf``, then
    kept to what describes this checkpoint): its bytes and its content.

    Without ``preprocessing`` the source weights' preprocessing is dropped (timm then assumes
    its defaults) unless ``keep_source``; an input size the architecture fixes is kept."""
    from timm.models._hub import save_config_for_hf

    model_config = {"label_names": list(class_names)} if class_names else None
    data_config = dict(preprocessing or {})
    with tempfile.TemporaryDirectory(prefix="oodunleash-timm-") as scratch:
        path = Path(scratch) / TIMM_CONFIG_NAME
        try:
            save_config_for_hf(
                model,
                str(path),
                model_config=model_config,
                model_args=dict(extra_args),
                data_config=data_config or None,
            )
        except ValueError as exc:
            raise ValueError(
                f"timm could not describe this model for its config.json: {exc} Pass JSON-able "
                "replacements with model_kwargs={...}, and an input_size the model accepts."
            ) from exc
        config = json.loads(path.read_text(encoding="utf-8"))
    pretrained = config["pretrained_cfg"]
    for key in _SOURCE_KEYS & set(pretrained):
        del pretrained[key]
    if not preprocessing and not keep_source:
        dropped = set(PREPROCESSING_KEYS)
        if pretrained.get("fixed_input_size"):
            dropped.discard("input_size")
        for key in dropped & set(pretrained):
            del pretrained[key]
    config["model_args"] = check_json(config.get("model_args", {}), "The timm model_args")
    return json.dumps(config, indent=2).encode(), config


def recorded_preprocessing(config: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing entries of a timm config (what ``resolve_data_config`` will read)."""
    pretrained = config.get("pretrained_cfg") or {}
    return {k: pretrained[k] for k in PREPROCESSING_KEYS if k in pretrained}


def build_timm_model(folder: Path) -> nn.Module:
    """The architecture of a checkpoint's ``config.json`` with its recorded ``pretrained_cfg``
    (so ``resolve_data_config`` gives the saved preprocessing); weights are loaded apart."""
    import timm
    from timm.models import PretrainedCfg
    from timm.models._hub import load_model_config_from_path

    read_json(folder / TIMM_CONFIG_NAME)  # a damaged file is named as such
    try:
        pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{TIMM_CONFIG_NAME} in {folder} is not a timm model config ({exc!r})."
        ) from exc
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise IncompatibleCheckpointError(
            f"The checkpoint's timm architecture {architecture!r} is not known to the installed "
            f"timm {timm.__version__}: upgrade timm (pip install -U timm), or pass model= with "
            "the architecture."
        )
    args = dict(model_args or {})
    dropped = sorted(set(args) & _UNSAFE_ARGS)
    for key in dropped:
        del args[key]
    if dropped:
        warnings.warn(f"Ignoring the checkpoint's model_args {dropped}.", stacklevel=4)
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in pretrained_cfg.items()
        if k in known and k not in {"file", "source", "hf_hub_id", "url"}
    }
    if cfg.get("num_classes") is not None:
        args.setdefault("num_classes", cfg["num_classes"])
    return timm.create_model(architecture, pretrained=False, pretrained_cfg=cfg, **args)


def record_known_preprocessing(owner: Any, options: dict[str, Any]) -> None:
    """Save options without preprocessing get the one ``owner`` knows."""
    given = [k for k in (*PREPROCESSING_ARGS, "data_config") if options.get(k) is not None]
    if not given and owner._preprocessing:
        options["data_config"] = owner._preprocessing


def remember_preprocessing(owner: Any, options: Mapping[str, Any]) -> None:
    """After a save: the preprocessing it was given is the model's from now on."""
    explicit = {k: options.get(k) for k in PREPROCESSING_ARGS}
    recorded = resolve_preprocessing(explicit, options.get("data_config"))
    if recorded:
        owner._preprocessing = recorded
