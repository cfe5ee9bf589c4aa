"""Resolving the MODEL argument: a timm name (with ``--checkpoint``), an ``hf-hub:`` id, or a
checkpoint folder written by ``OODUnleash.save_pretrained``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from oodunleash.cli._errors import UsageError
from oodunleash.wrapper import OODUnleash

__all__ = ["ResolvedModel", "read_state_dict", "resolve_model"]

#: Prefixes that wrappers add to state-dict keys: DDP's ``module.``, ``torch.compile``'s
#: ``_orig_mod.``.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HUB_PREFIX = "hf-hub:"


@dataclass
class ResolvedModel:
    """The classifier named by MODEL.

    Attributes:
        model: The ``nn.Module``.
        unleashed: The wrapper read from an oodunleash checkpoint (fitted scores included), or
            ``None`` when MODEL named an architecture or a plain timm checkpoint.
        source: How MODEL was read, for messages.
    """

    model: nn.Module
    unleashed: OODUnleash | None
    source: str

    def wrapper(self) -> OODUnleash:
        """The checkpoint's wrapper, or a new post-hoc wrapper around the model (scoring by
        Energy, which needs no training images, unless a command names its scores)."""
        if self.unleashed is not None:
            return self.unleashed
        return OODUnleash(self.model, score="energy")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Weights from a ``.safetensors`` file (no pickle) or a ``.pt``/``.pth``/``.bin`` state dict
    (``torch.load(weights_only=True)``), wrapper prefixes removed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"--checkpoint {path}: no such file.")
    suffix = file.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise UsageError(
                f"--checkpoint {path}: expected a .safetensors, .pt or .pth file, got {suffix!r}."
            )
    except UsageError:
        raise
    except Exception as exc:  # a truncated file, or a pickle that weights_only refuses
        raise UsageError(
            f"--checkpoint {path}: cannot read it ({type(exc).__name__}: {exc})."
        ) from None
    if isinstance(state, dict):  # training scripts often nest the weights
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"--checkpoint {path}: not a state dict of tensors.")
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _classes_in_state(name: str, state: dict[str, Tensor]) -> int | None:
    """Rows of the classifier weight in ``state``, found by the name timm gives the
    architecture's classifier."""
    from timm.models import get_pretrained_cfg

    classifier = getattr(get_pretrained_cfg(name), "classifier", None)
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _load_state(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise UsageError(
            f"--checkpoint {path} does not fit the model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}. Check MODEL "
            "(the architecture the checkpoint was trained with) and --num-classes."
        )


def _timm_model(name: str, checkpoint: str | None, num_classes: int | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.8)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise UsageError(
            f"Unknown model {name!r}: not a timm architecture, an hf-hub: id or a checkpoint "
            f"folder.{hint}"
        )
    state = read_state_dict(checkpoint) if checkpoint else None
    if state is not None and num_classes is None:
        num_classes = _classes_in_state(name, state)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"Cannot build the timm model {name!r}: {exc}") from None
    if state is not None:
        try:
            _load_state(model, state, str(checkpoint))
        except RuntimeError as exc:  # shape mismatches
            first = str(exc).strip().splitlines()[-1].strip()
            raise UsageError(
                f"--checkpoint {checkpoint} does not fit {name!r}: {first} Check MODEL and "
                "--num-classes."
            ) from None
    return model


def _hub_model(repo_id: str) -> ResolvedModel:
    """An oodunleash checkpoint on the Hub, else a plain timm model repo."""
    from oodunleash import HubError

    try:
        unleashed = OODUnleash.from_pretrained(repo_id)
        return ResolvedModel(unleashed.model, unleashed, f"{_HUB_PREFIX}{repo_id}")
    except HubError as not_ours:
        import timm

        try:  # a plain timm repo: weights are safetensors or weights_only-loaded by timm
            model = timm.create_model(f"{_HUB_PREFIX}{repo_id}", pretrained=True)
        except Exception:
            raise not_ours from None
        return ResolvedModel(model, None, f"{_HUB_PREFIX}{repo_id} (timm)")


def resolve_model(
    spec: str, *, checkpoint: str | None = None, num_classes: int | None = None
) -> ResolvedModel:
    """The classifier MODEL names.

    ``num_classes`` sizes a timm architecture's head; with ``--checkpoint`` and no
    ``num_classes`` the head takes the checkpoint's size.
    """
    folder = Path(spec).expanduser()
    if folder.is_dir() or spec.startswith(_HUB_PREFIX):
        if checkpoint:
            raise UsageError(
                f"--checkpoint applies to a timm architecture name; {spec} already holds its "
                "weights."
            )
        if folder.is_dir():
            try:
                unleashed = OODUnleash.from_pretrained(folder)
            except TypeError as exc:  # a custom architecture needs its class, which JSON lacks
                raise UsageError(
                    f"MODEL {spec}: {exc} The command line rebuilds timm architectures only; "
                    "load this one in Python: OODUnleash.from_pretrained(folder, model=...)."
                ) from None
            return ResolvedModel(unleashed.model, unleashed, str(folder))
        return _hub_model(spec[len(_HUB_PREFIX) :])
    if folder.exists() or os.sep in spec or spec.startswith("."):
        raise UsageError(
            f"MODEL {spec}: not a checkpoint folder. Pass the folder that save_pretrained or "
            "`oodunleash fit --out` wrote, or a timm name with --checkpoint FILE."
        )
    return ResolvedModel(
        _timm_model(spec, checkpoint, num_classes),
        None,
        spec + (f" + {checkpoint}" if checkpoint else ""),
    )
