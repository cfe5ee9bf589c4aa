"""Tensors to and from safetensors: the model's weights, masks as packed bits, prefixed groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from oodunleash.checkpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from oodunleash.runtime.modules import unwrap_compiled

__all__ = ["load_model_state", "pack_bits", "unpack_bits"]

_COMPILED_PREFIX = "_orig_mod."


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean (or 0/1) tensor into ``uint8``, eight entries per byte, most significant
    bit first (``numpy.packbits``). The shape is not stored.

    Example:
        >>> pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]))
        tensor([176, 128], dtype=torch.uint8)
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``.

    Example:
        >>> unpack_bits(torch.tensor([176, 128], dtype=torch.uint8), (9,)).int()
        tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.int32)
    """
    numel = int(np.prod(shape, dtype=np.int64))
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{packed.numel()} packed bytes ({packed.dtype}) cannot hold a mask of shape "
            f"{tuple(shape)}."
        )
    bits = np.unpackbits(packed.reshape(-1).cpu().numpy(), count=numel).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def tensors_for_saving(state: Mapping[str, Any], what: str) -> dict[str, Tensor]:
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


def safetensors_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    return save(dict(tensors), metadata={"format": "pt"})


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{path.name} in {path.parent} is not a readable safetensors file ({exc}). It is "
            "truncated or damaged: re-download it (force_download=True) or save it again."
        ) from exc


def split_prefixed(tensors: Mapping[str, Tensor], path: Path) -> dict[str, dict[str, Tensor]]:
    """``{"a/x": t}`` -> ``{"a": {"x": t}}``."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        prefix, sep, rest = key.partition("/")
        if not sep:
            raise CorruptCheckpointError(
                f"{path.name} in {path.parent} holds the tensor {key!r}, which has no "
                "'<group>/' prefix: the file is damaged."
            )
        grouped.setdefault(prefix, {})[rest] = value
    return grouped


def _qualname(module: nn.Module) -> str:
    # A UMAP mask swaps a module's class for a generated subclass; report the user's class.
    cls = getattr(type(module), "_oodunleash_original_class", type(module))
    return f"{cls.__module__}.{cls.__qualname__}"


def _strip_compiled_prefix(state: dict[str, Tensor], expected: Mapping[str, Any]) -> dict:
    # A state_dict taken from a torch.compile wrapper: every key carries `_orig_mod.`.
    if (
        state
        and all(k.startswith(_COMPILED_PREFIX) for k in state)
        and not any(k.startswith(_COMPILED_PREFIX) for k in expected)
    ):
        return {k[len(_COMPILED_PREFIX) :]: v for k, v in state.items()}
    return state


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (or the module behind its ``torch.compile`` wrapper) after
    checking names and shapes; ``model`` is left untouched when they do not match."""
    model = unwrap_compiled(model)
    expected = model.state_dict()
    state = _strip_compiled_prefix(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(v, Tensor) and tuple(v.shape) != tuple(state[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return
    lines = []
    if mismatched:
        lines.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        lines.append("missing from the checkpoint: " + ", ".join(missing))
    if unexpected:
        lines.append("not in the model: " + ", ".join(unexpected))
    if any(_COMPILED_PREFIX in k for k in [*state, *expected]):
        lines.append(
            f"some keys carry torch.compile's {_COMPILED_PREFIX!r} prefix: save and load the "
            "plain module (oodunleash saves it unwrapped)"
        )
    raise CheckpointMismatchError(
        f"The model ({_qualname(model)}) does not match the checkpoint in {source}: "
        + " | ".join(lines)
        + ". Pass the architecture (and constructor arguments) the checkpoint was saved with."
    )
