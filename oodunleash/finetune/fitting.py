"""The fine-tune behind :meth:`OODUnleash.fit <oodunleash.OODUnleash.fit>`: checks on its
inputs, the choice of ξ, UM or UMAP through :func:`~oodunleash.finetune.loop.train`, and the
per-epoch check that a run has not diverged.

Functions here take explicit arguments; the wrapper owns the state and the all-or-nothing
transaction around them (:mod:`oodunleash.finetune.rollback`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oodunleash.finetune.constraint import estimate_loss_constraint, relative_loss_constraint
from oodunleash.finetune.loop import (
    TrainConfig,
    TrainingDivergedError,
    norm_affine_parameters,
    train,
)
from oodunleash.finetune.options import train_config, training_options
from oodunleash.finetune.recipes import (
    METHOD_DEFAULTS,
    Masked,
    MethodOptions,
    Relative,
    check_constraint,
    real_number,
)
from oodunleash.finetune.resume import (
    EpochHook,
    FitStateError,
    check_fit_state,
    read_fit_state,
    run_identity,
)
from oodunleash.masks.layer_masks import LayerMasks
from oodunleash.runtime.distributed import init_distributed, rank, shard_loader, sync_module
from oodunleash.runtime.modules import check_materialised, model_device, unwrap_compiled

__all__ = [
    "fit_config",
    "check_epoch",
    "check_materialised",
    "check_model",
    "check_reiterable",
    "check_same_fit",
    "choose_constraint",
    "fine_tune",
    "rolled_back",
    "run_fit",
    "saved_fit_state",
    "summary",
    "trained_norm_parameters",
]

#: A mean training cross-entropy (nats) above this means the fine-tune diverged: a uniform
#: guess over a million classes costs 14 nats.
_EXPLODED_CE = 1e4


class _MaskedNetwork(nn.Module):
    """Model and its mask scores in one module, so DDP synchronises the score gradients."""

    def __init__(self, model: nn.Module, masks: LayerMasks) -> None:
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def check_model(model: Any) -> None:
    """``model`` must be a module that no other OODUnleash has masked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module classifier, got {type(model).__name__}.")
    if any("_oodunleash_mask" in m.__dict__ for m in model.modules()):
        raise ValueError(
            "This model still carries the UMAP mask of another OODUnleash. Wrap a plain "
            "copy instead: OODUnleash(other.export(), ...)."
        )


def fit_config(
    model: nn.Module,
    method: str,
    epochs: int | None,
    lr: float | None,
    training: Any,
    loader: Any,
    outlier_loader: Any,
) -> tuple[TrainConfig, list[nn.Parameter]]:
    """A fit's checked inputs: its :class:`TrainConfig` (``training`` over ``method``'s
    defaults) and the normalisation parameters UMAP trains with its scores."""
    options = training_options(training)
    norm_params = trained_norm_parameters(model, method, options.pop("train_norms", None))
    if options.get("outlier_loss") is None and outlier_loader is not None:
        options["outlier_loss"] = "oe"
    config = train_config(method, epochs=epochs, lr=lr, train_norms=bool(norm_params), **options)
    check_reiterable(loader, "loader")
    if outlier_loader is not None:
        check_reiterable(outlier_loader, "outlier_loader")
    return config, norm_params


def check_reiterable(loader: Any, name: str) -> None:
    """``loader`` must be an iterable that can be read more than once (not a generator)."""
    if isinstance(loader, Iterator):
        raise TypeError(
            f"{name} is a one-shot iterator ({type(loader).__name__}): fit reads the data "
            "several times (ξ, then each epoch), and a second pass would find it empty. Pass a "
            "DataLoader or a list of (images, labels) batches."
        )
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"{name} must be an iterable of (images, labels) batches such as a DataLoader, got "
            f"{type(loader).__name__}."
        )


def check_epoch(record: Mapping[str, float]) -> None:
    """Raise :class:`TrainingDivergedError` when an epoch's loss is not finite or its mean
    training cross-entropy exploded."""
    loss, ce = record["loss"], record["ce"]
    if math.isfinite(loss) and math.isfinite(ce) and ce <= _EXPLODED_CE:
        return
    raise TrainingDivergedError(
        f"The loss reached {loss:.4g} (training cross-entropy {ce:.4g}) in epoch "
        f"{int(record['epoch'])}: the fine-tune diverged."
    )


def trained_norm_parameters(
    model: nn.Module, method: str, train_norms: bool | None
) -> list[nn.Parameter]:
    """The normalisation parameters UMAP trains with its scores (none for UM), checked."""
    if train_norms and method != "umap":
        raise ValueError(
            "train_norms applies to UMAP, which freezes the weights; UM already trains "
            "every parameter, normalisation layers included. Drop train_norms, or use "
            "method='umap'."
        )
    if method == "um":
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "UM fine-tunes the parameters that have requires_grad=True, and this model "
                "has none (it is fully frozen). Unfreeze the layers to fine-tune "
                "(param.requires_grad_(True)), or use method='umap', which learns a mask "
                "over frozen weights."
            )
        return []
    norm_params, frozen_norms = norm_affine_parameters(model)
    if train_norms and not norm_params:
        if frozen_norms:
            raise ValueError(
                f"train_norms=True, but all {frozen_norms} scale/shift parameters of the "
                "model's normalisation layers have requires_grad=False, and fit leaves "
                "frozen parameters frozen. Unfreeze the ones to train "
                "(param.requires_grad_(True)), or drop train_norms."
            )
        raise ValueError(
            "train_norms=True, but the model has no normalisation layer with affine "
            "parameters (BatchNorm, LayerNorm, GroupNorm, ...): there is nothing to train "
            "besides the scores. Drop train_norms."
        )
    if train_norms is None:
        train_norms = METHOD_DEFAULTS["umap"]["train_norms"]
    return norm_params if train_norms else []


def saved_fit_state(
    checkpoint_dir: str | Path | None, resume: bool, outlier_loader: Any
) -> dict[str, Any] | None:
    """The fit state to resume from (``None``: start afresh), after checking the options."""
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True continues a fit saved in checkpoint_dir: pass it.")
        return None
    if outlier_loader is not None:
        raise ValueError(
            "checkpoint_dir cannot resume the outlier stream of outlier_loader: fit with "
            "outlier exposure without checkpoint_dir."
        )
    _check_checkpoint_dir(Path(checkpoint_dir))
    return read_fit_state(checkpoint_dir) if resume else None


def _check_checkpoint_dir(folder: Path) -> None:
    """Refuse a ``checkpoint_dir`` the first epoch's save would fail on, before any work."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"checkpoint_dir {folder} is a file; pass a folder (it is created if missing)."
        )
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not (os.access(existing, os.W_OK) and existing.stat().st_mode & 0o200):
        raise PermissionError(
            f"checkpoint_dir {folder} cannot be written ({existing} is read-only), so no epoch "
            "could be saved. Pass a writable folder, or make it writable (chmod u+w)."
        )


def choose_constraint(
    model: nn.Module,
    spec: float | Relative | Masked | None,
    loader: Iterable,
    *,
    estimate_masked: Callable[..., float],
    progress: bool,
) -> float | None:
    """ξ by ``spec``: a number is ξ; :class:`Relative` scales the training loss;
    :class:`Masked` calls ``estimate_masked(loader, keep_ratio, progress=...)``. ``None``
    (no flooding) gives ``None``."""
    if isinstance(spec, Masked):
        return estimate_masked(loader, spec.keep_ratio, progress=progress)
    if isinstance(spec, Relative):
        return relative_loss_constraint(model, loader, spec.factor, progress=progress)
    return spec


def masked_constraint(
    model: nn.Module,
    config: MethodOptions,
    loader: Iterable,
    keep_ratio: float | None,
    *,
    masks: LayerMasks | None,
    init: str | None,
    **options: Any,
) -> float:
    """ξ by the paper's recipe for :meth:`OODUnleash.estimate_loss_constraint`: ``keep_ratio``
    defaults to the ``Masked`` constraint's (else its default), ``init`` to UMAP's
    ``mask_init`` (else random). ``options`` go to :func:`~oodunleash.finetune.constraint.estimate_loss_constraint`."""
    init_distributed()
    if masks is not None and masks.is_attached:
        raise RuntimeError(
            "The model carries a learnt UMAP mask; estimate ξ on the original model: "
            "OODUnleash(original_model).estimate_loss_constraint(...)."
        )
    if keep_ratio is None:
        keep_ratio = getattr(check_constraint(config.constraint), "keep_ratio", Masked().keep_ratio)
    return estimate_loss_constraint(
        unwrap_compiled(model), shard_loader(loader), real_number(keep_ratio, "keep_ratio"),
        layers=config.layers, exclude=config.exclude, init=init or config.mask_init or "random",
        seed=config.seed, **options,
    )  # fmt: skip


def check_same_fit(saved: Mapping[str, Any], record: Mapping[str, Any], where: Any) -> None:
    """Refuse to resume a saved fit state with options other than this call's."""
    now = json.loads(json.dumps(record))  # the saved record went through JSON too
    different = [
        f"{group}.{key}: saved {saved[group].get(key)!r}, now {value!r}"
        for group in ("params", "train_config")
        for key, value in now[group].items()
        if saved.get(group, {}).get(key) != value
    ]
    if different:
        raise FitStateError(
            f"The fit state in {where} was saved by a fit with different options "
            f"({'; '.join(different)}). Call fit with the same options, or resume=False to "
            "start again."
        )


def fine_tune(
    model: nn.Module,
    options: MethodOptions,
    config: TrainConfig,
    loader: Iterable,
    loss_constraint: float | None,
    *,
    norm_params: list[nn.Parameter],
    outlier_loader: Iterable | None,
    progress: bool,
    make_hook: Callable[[nn.Module], EpochHook],
) -> tuple[list[dict[str, float]], LayerMasks | None]:
    """UM (the trainable weights) or UMAP (mask scores, and ``norm_params``, over frozen
    weights) on ``model``: the history, and UMAP's masks, attached."""

    def run(module: nn.Module, params: list[nn.Parameter], desc: str) -> list[dict[str, float]]:
        return train(
            module,
            params,
            loader,
            loss_constraint=loss_constraint,
            config=config,
            device=model_device(model),
            outlier_loader=outlier_loader,
            progress=progress,
            desc=desc,
            hook=make_hook(module),
        )

    if options.method == "um":
        return run(model, [p for p in model.parameters() if p.requires_grad], "UM"), None
    masks = LayerMasks(
        unwrap_compiled(model),  # layer names without torch.compile's `_orig_mod.` prefix
        options.layers,
        options.exclude,
        keep_ratio=options.keep_ratio,
        mode=options.mask_mode,
        init=options.mask_init,
        seed=options.seed,
    )
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for p in norm_params:
        p.requires_grad_(True)
    masks.attach()
    try:
        history = run(_MaskedNetwork(model, masks), [*masks.parameters(), *norm_params], "UMAP")
    except BaseException:
        masks.detach()  # never leave the user's model half-masked
        raise
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return history, masks


def rolled_back(exc: TrainingDivergedError) -> TrainingDivergedError:
    """The error ``fit`` raises after rolling a diverged fit back (``train`` had restored only
    the last good epoch)."""
    reason = str(exc).split(" The weights were restored")[0]
    return TrainingDivergedError(
        f"{reason} fit() was rolled back: the model and the wrapper are as before the call. "
        "Lower the learning rate, set max_grad_norm, or check the inputs for NaN."
    )


def summary(
    method: str, loss_constraint: float | None, history: list[dict[str, float]], seconds: float
) -> str:
    """The one line ``fit(progress=True)`` prints at the end."""
    first, last = history[0], history[-1]
    xi = "none (control)" if loss_constraint is None else f"{loss_constraint:.4g}"
    return (
        f"{method.upper()} fit in {seconds:.1f} s: ξ {xi}; training CE {first['ce']:.4g} -> "
        f"{last['ce']:.4g}, accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f} "
        f"(epoch {int(first['epoch'])} -> {int(last['epoch'])})."
    )


def run_fit(
    model: nn.Module,
    options: MethodOptions,
    config: TrainConfig,
    loader: Iterable,
    *,
    outlier_loader: Iterable | None,
    constraint: float | Relative | Masked | None,
    norm_params: list[nn.Parameter],
    estimate_masked: Callable[..., float],
    params: dict[str, Any],
    device: torch.device | str | None,
    progress: bool,
    checkpoint_dir: str | Path | None,
    saved: dict[str, Any] | None,
) -> tuple[float | None, list[dict[str, float]], LayerMasks | None]:
    """ξ (by ``constraint``, or the ``saved`` state's) and the fine-tune: ξ, the history and
    UMAP's masks. ``params`` (the wrapper's options) are saved with each epoch's state."""
    # Under torchrun / accelerate launch: join the process group, read one shard of the
    # data per rank, start every rank from rank 0's weights (docs/howto/distributed.md).
    init_distributed()
    if device is not None:
        model.to(device)
    sync_module(model)
    # A resume state names its run: the model as the fit began and the data's size.
    identity = None if checkpoint_dir is None else run_identity(model, loader)
    if saved is not None:
        check_fit_state(saved, identity, config.epochs, constraint is not None, checkpoint_dir)
    loader = shard_loader(loader)
    if outlier_loader is not None:
        outlier_loader = shard_loader(outlier_loader, name="outlier_loader")
    # Seed inside a fork so the whole fit (shuffling included) is reproducible without
    # touching the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        # Offset by the rank so that dropout differs between ranks (rank 0 = one process);
        # masks and ξ use their own seeded generators and agree on every rank.
        torch.manual_seed(options.seed + rank())
        if saved is not None:
            xi = saved["loss_constraint"]
        else:
            xi = choose_constraint(
                model, constraint, loader, estimate_masked=estimate_masked, progress=progress
            )
        record = {"loss_constraint": xi, "params": params, "train_config": config.to_dict()}
        if identity is not None:
            record["run"] = identity
        if saved is not None:
            check_same_fit(saved, record, checkpoint_dir)

        def make_hook(module: nn.Module) -> EpochHook:
            return EpochHook(
                module, loader, check_epoch, directory=checkpoint_dir, record=record, saved=saved
            )

        history, masks = fine_tune(
            model,
            options,
            config,
            loader,
            xi,
            norm_params=norm_params,
            outlier_loader=outlier_loader,
            progress=progress,
            make_hook=make_hook,
        )
    return xi, history, masks
