"""The forgetting fine-tune: UM (weights) or UMAP (mask scores) with the flooding objective.

Both minimise ``|CE − ξ| + ξ`` per batch (Ishida et al.'s flooding): gradient descent while
the batch loss is above ξ, gradient ascent below it, so the model settles around ξ instead of
driving the loss of memorised atypical samples to zero. An optional outlier-exposure term adds
OE or Energy-OE on auxiliary outliers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oodunleash.finetune.divergence import DivergenceCheck
from oodunleash.finetune.losses import energy_oe_loss, flooding_loss, oe_loss
from oodunleash.finetune.options import (
    LossConstraintTooHighError,
    TrainConfig,
    TrainingDivergedError,
)
from oodunleash.finetune.step import Step, run_epoch
from oodunleash.masks.layer_masks import attached_masks
from oodunleash.runtime.batches import images_of, model_dtype
from oodunleash.runtime.distributed import (
    check_distributed_sampler,
    check_same_on_all_ranks,
    is_distributed,
    is_main_process,
    sync_buffers,
)
from oodunleash.runtime.modules import check_materialised

__all__ = [
    "LossConstraintTooHighError",
    "TrainConfig",
    "TrainingDivergedError",
    "energy_oe_loss",
    "flooding_loss",
    "norm_affine_parameters",
    "oe_loss",
    "train",
]


#: Normalisation layers whose affine parameters (scale and shift) ``train_norms`` trains.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def norm_affine_parameters(module: nn.Module) -> tuple[list[nn.Parameter], int]:
    """The trainable scale and shift parameters of ``module``'s normalisation layers, and how
    many such parameters the caller froze (``requires_grad=False``): those stay frozen.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
        >>> net[2].bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> trainable, frozen = norm_affine_parameters(net)
        >>> len(trainable), frozen
        (3, 1)
    """
    params = [
        p
        for m in module.modules()
        if isinstance(m, NORM_TYPES)
        for p in m.parameters(recurse=False)
    ]
    trainable = [p for p in params if p.requires_grad]
    return trainable, len(params) - len(trainable)


# --------------------------------------------------------------------------- set-up
def _cycle(loader: Iterable) -> Iterator[Tensor]:
    """Endless stream of outlier images, re-iterating the loader when it runs out."""
    for cycle in itertools.count():
        empty = True
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles only when told
            sampler.set_epoch(cycle)
        for batch in loader:
            empty = False
            yield images_of(batch)
        if empty:
            raise ValueError("The outlier loader yielded no batches: is the dataset empty?")


@contextlib.contextmanager
def _norm_stats_frozen(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Keep BatchNorm layers in eval mode (running statistics fixed) while training."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    if enabled:
        for m in norms:
            m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _steps_per_epoch(loader: Iterable, config: TrainConfig) -> int | None:
    """``len(loader)`` (``None`` if it has none), checked against what the config needs."""
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps = None
    if steps is None and not callable(config.schedule) and config.schedule != "constant":
        raise TypeError(
            "The cosine schedule needs len(loader); this loader has none. Pass "
            "schedule='constant' or a scheduler factory."
        )
    if steps == 0:
        raise ValueError("The data loader has no batches: is the dataset empty?")
    return steps


def _trained_module(module: nn.Module, steps: int | None, device: torch.device) -> nn.Module:
    """``module`` itself, or wrapped in DistributedDataParallel under a process group."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Uneven shards would leave one rank waiting in a gradient all-reduce forever.
    check_same_on_all_ranks(
        -1 if steps is None else steps, "the number of batches per epoch", device
    )
    ids = [device] if device.type == "cuda" else None
    # The wrapper broadcasts rank 0's parameters and buffers, so all ranks start equal.
    # Gradients are averaged over ranks, so each rank's flooding term |CE_r - ξ| acts on
    # its own per-rank batch (like BatchNorm statistics), not on the global batch.
    return DistributedDataParallel(module, device_ids=ids)


def _with_norm_parameters(
    module: nn.Module, params: list[nn.Parameter], config: TrainConfig
) -> list[nn.Parameter]:
    """``params``, plus the normalisation layers' trainable scale and shift when
    ``config.train_norms`` asks for them (each parameter once)."""
    if not config.train_norms:
        return params
    seen = {id(p) for p in params}
    return params + [p for p in norm_affine_parameters(module)[0] if id(p) not in seen]


def _forward(trained: nn.Module, config: TrainConfig) -> Callable[[Tensor], Any]:
    """The module's forward pass, compiled if the config asks for it."""
    if config.channels_last:
        trained.to(memory_format=torch.channels_last)
    if config.compile is False:
        return trained
    options = {} if config.compile is True else dict(config.compile)
    compiled = torch.compile(trained, **options)
    masks = attached_masks(trained)
    if masks is None:
        return compiled

    def forward(images: Tensor) -> Any:
        # Masked weights made eagerly enter the graph as inputs: one graph for the whole
        # pass, where reading them inside it broke the graph at every masked layer.
        with masks.precomputed(trained.training):
            return compiled(images)

    return forward


def train(
    module: nn.Module,
    params: list[nn.Parameter],
    loader: Iterable,
    *,
    loss_constraint: float | None,
    config: TrainConfig,
    device: torch.device,
    outlier_loader: Iterable | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
    hook: Any = None,
) -> list[dict[str, float]]:
    """Run the fine-tune of ``params`` (which belong to ``module``) and return the history.

    ``module`` maps images to logits. When the loss diverges (see :class:`TrainConfig`) the
    state of ``module`` is restored to the end of the last complete epoch and
    :class:`TrainingDivergedError` is raised; on any other exception (a ``KeyboardInterrupt``
    included) the state is restored the same way and the exception propagates.

    ``hook`` (see :class:`oodunleash.finetune.resume.EpochHook`): ``hook.start(optimizer, scheduler,
    scaler)`` returns the first epoch and the history so far (a resumed fit);
    ``hook.epoch_end(history, optimizer, scheduler, scaler)`` runs after each epoch.
    Example:
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> history = train(net, list(net.parameters()), data, loss_constraint=0.5,
        ...                 config=TrainConfig(epochs=1), device=torch.device("cpu"),
        ...                 progress=False)
        >>> len(history), history[0].get("epoch")
        (1, 1)
    """
    check_materialised(module)
    check_distributed_sampler(loader)
    if outlier_loader is not None and config.outlier_loss is None:
        # A copy: the caller's config stays as given.
        config = replace(config, outlier_loss="oe")
    steps_per_epoch = _steps_per_epoch(loader, config)
    params = _with_norm_parameters(module, params, config)
    trained = _trained_module(module, steps_per_epoch, device)
    step = Step(
        _forward(trained, config),
        params,
        loss_constraint,
        config,
        device,
        (steps_per_epoch or 1) * config.epochs,
        _cycle(outlier_loader) if outlier_loader is not None else None,
        model_dtype(module),
        model=module,
    )
    divergence = DivergenceCheck(config, device)
    history: list[dict[str, float]] = []
    first_epoch = 0
    if hook is not None:
        first_epoch, history = hook.start(step.optimizer, step.scheduler, step.scaler)
    good_state = _snapshot(module)
    was_training = module.training
    show = progress and is_main_process()
    try:
        module.train()
        with _norm_stats_frozen(module, config.freeze_norm_stats):
            for epoch in range(first_epoch, config.epochs):
                label = f"{desc} {epoch + 1}/{config.epochs}"
                with tqdm(total=steps_per_epoch, desc=label, disable=not show, leave=False) as bar:
                    history.append(run_epoch(step, loader, epoch, divergence, bar))
                # Each rank's last forward moved its BatchNorm statistics on its own batch.
                sync_buffers(module)
                if hook is not None:
                    hook.epoch_end(history, step.optimizer, step.scheduler, step.scaler)
                good_state = _snapshot(module)
    except BaseException:
        # Never leave the model half-trained after an error or a Ctrl-C.
        module.load_state_dict(good_state)
        raise
    finally:
        module.train(was_training)
        # The last step's gradients would hold a model-sized block of memory for nothing.
        step.optimizer.zero_grad(set_to_none=True)
    return history
