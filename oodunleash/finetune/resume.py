"""Resumable fits: the state of a fine-tune at the end of each epoch, saved atomically.

``fit(..., checkpoint_dir=DIR)`` writes ``DIR/fit_state.safetensors`` after every epoch: the
trained module's ``state_dict`` (UMAP: the mask scores with the model), the optimizer,
scheduler and gradient-scaler states, torch's random state (and the loader's own generator,
if it has one), the epochs done, their history and ξ. Tensors are safetensors; everything else
is JSON in the file's metadata, so loading runs no code. One file, written through a temporary
file and a rename: a kill at any instant leaves the previous epoch's state or the new one.

``fit(..., checkpoint_dir=DIR, resume=True)`` loads it and runs the remaining epochs; on CPU
the result is bit-identical to an uninterrupted fit (same data order, same dropout draws).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from oodunleash.runtime.distributed import is_main_process
from oodunleash.runtime.files import write_atomic

__all__ = [
    "STATE_FILE",
    "EpochHook",
    "FitStateError",
    "check_fit_state",
    "read_fit_state",
    "run_identity",
]

#: The file ``fit(checkpoint_dir=...)`` writes.
STATE_FILE = "fit_state.safetensors"
_META_KEY = "oodunleash_fit_state"
_FORMAT = 1


class FitStateError(ValueError):
    """A saved fit state cannot be resumed: damaged, or from a different fit."""


def _split(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON skeleton of ``obj``; its tensors go to ``tensors`` under dotted keys."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(
        f"fit(checkpoint_dir=...) cannot save {prefix} ({type(obj).__name__}): use a built-in "
        "optimizer and schedule, or fit without checkpoint_dir."
    )


def _join(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _generators(loader: Iterable) -> list[torch.Generator]:
    """The loader's own random generators (its shuffling), if it has any."""
    found = []
    for owner in (loader, getattr(loader, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def read_fit_state(directory: str | Path) -> dict[str, Any] | None:
    """The state saved in ``directory`` (``None`` if there is none): its JSON record, with
    the tensors under ``"tensors"``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META_KEY])
        meta["tensors"] = load_tensors(path.read_bytes())
    except (SafetensorError, KeyError, ValueError, OSError, RecursionError) as exc:
        raise FitStateError(
            f"{path} is not a readable fit state ({exc}). Delete it, or fit with resume=False."
        ) from exc
    if meta.get("format") != _FORMAT:
        raise FitStateError(f"{path} has format {meta.get('format')!r}; expected {_FORMAT}.")
    return meta


def _fingerprint(module: nn.Module) -> dict[str, str]:
    """Digests of ``module``'s ``state_dict``: its names, shapes and dtypes, and its values."""
    layout, values = hashlib.sha256(), hashlib.sha256()
    for name, tensor in module.state_dict().items():
        layout.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        values.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return {"layout": layout.hexdigest()[:16], "weights": values.hexdigest()[:16]}


def run_identity(module: nn.Module, loader: Iterable) -> dict[str, Any]:
    """What a resume state records of the run it belongs to: the model as the fit began
    (architecture and weights) and the number of batches of its data."""
    batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return {"model": _fingerprint(module), "batches": batches}


def _refuse(where: Any, problem: str) -> FitStateError:
    return FitStateError(
        f"The fit state in {where} {problem}. Resume the run that saved it, or fit with "
        "resume=False (or another checkpoint_dir) to start again."
    )


def check_fit_state(
    saved: dict[str, Any], identity: dict[str, Any], epochs: int, flooding: bool, where: Any
) -> None:
    """Refuse a saved state that belongs to another run, or whose fields were edited into
    values no fit writes, before anything is loaded from it."""
    run = saved.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise _refuse(where, "does not say which model and data it belongs to (an older "
                      "oodunleash wrote it, or it was edited)")  # fmt: skip
    if run["model"].get("layout") != identity["model"]["layout"]:
        raise _refuse(where, "was saved by a fit of a different architecture (other parameter "
                      "names or shapes)")  # fmt: skip
    if run["model"].get("weights") != identity["model"]["weights"]:
        raise _refuse(where, "was saved by a fit of a different model (its weights differed "
                      "when that fit began)")  # fmt: skip
    if run.get("batches") != identity["batches"]:
        raise _refuse(where, f"was saved by a fit on other data ({run.get('batches')} batches "
                      f"per epoch, now {identity['batches']})")  # fmt: skip
    epoch, history = saved.get("epoch"), saved.get("history")
    if type(epoch) is not int or not 1 <= epoch <= epochs:
        raise _refuse(where, f"has epoch {epoch!r}, not an epoch of this {epochs}-epoch fit")
    if not isinstance(history, list) or len(history) != epoch:
        raise _refuse(where, f"has a history that is not a list of {epoch} epoch records")
    if not all(isinstance(r, dict) and "loss" in r and "ce" in r for r in history):
        raise _refuse(where, "has a history whose entries are not epoch records")
    xi = saved.get("loss_constraint")
    if flooding:
        valid = type(xi) in (int, float) and 0 < xi < math.inf
        if not valid:
            raise _refuse(where, f"has loss_constraint {xi!r}: ξ must be a positive number")
    elif xi is not None:
        raise _refuse(where, f"has loss_constraint {xi!r}, but this fit has no ξ (flooding=False)")


class EpochHook:
    """What :func:`~oodunleash.finetune.loop.train` calls at its start and after each epoch.

    Args:
        module: The module being trained (its ``state_dict`` is saved and restored).
        loader: The training data (its own generator, if any, is saved and restored).
        check_epoch: Called with each epoch's history record; raises to stop the fit.
        directory: Where to save the state each epoch; ``None`` saves nothing.
        record: JSON facts saved with the state (ξ, the options) for the resumed run to check.
        saved: A state :func:`read_fit_state` returned, to resume from.
    """

    def __init__(
        self,
        module: nn.Module,
        loader: Iterable,
        check_epoch: Callable[[dict[str, float]], None],
        *,
        directory: str | Path | None = None,
        record: dict[str, Any] | None = None,
        saved: dict[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.loader = loader
        self.check_epoch = check_epoch
        self.directory = None if directory is None else Path(directory)
        self.record = record or {}
        self.saved = saved

    def start(self, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[int, list[dict]]:
        """Load the saved state, if any: the first epoch to run and the history so far."""
        if self.saved is None:
            return 0, []
        tensors = self.saved["tensors"]
        prefix = "module."
        self.module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        optimizer.load_state_dict(_join(self.saved["optimizer"], tensors))
        scheduler.load_state_dict(_join(self.saved["scheduler"], tensors))
        if self.saved["scaler"]:
            scaler.load_state_dict(self.saved["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        for i, gen in enumerate(_generators(self.loader)):
            if f"rng.loader.{i}" in tensors:
                gen.set_state(tensors[f"rng.loader.{i}"])
        return int(self.saved["epoch"]), list(self.saved["history"])

    def epoch_end(
        self, history: list[dict[str, float]], optimizer: Any, scheduler: Any, scaler: Any
    ) -> None:
        """Check the epoch, then save the state (on the main process)."""
        self.check_epoch(history[-1])
        if self.directory is None or not is_main_process():
            return
        tensors: dict[str, Tensor] = {}
        _split(self.module.state_dict(), "module", tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        for i, gen in enumerate(_generators(self.loader)):
            tensors[f"rng.loader.{i}"] = gen.get_state()
        meta = {
            "format": _FORMAT,
            **self.record,
            "epoch": len(history),
            "history": history,
            "optimizer": _split(optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _split(scheduler.state_dict(), "scheduler", tensors),
            "scaler": _split(scaler.state_dict(), "scaler", tensors),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        data = save_tensors(tensors, metadata={_META_KEY: json.dumps(meta)})
        write_atomic(self.directory / STATE_FILE, data)
