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
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._divergence import DivergenceCheck, TrainingDivergedError
from ._losses import (
    LossConstraintTooHighError,
    energy_oe_loss,
    flooding_loss,
    oe_loss,
)
from ._modules import check_materialised
from ._step import Step, run_epoch
from .batches import images_of, model_dtype
from .distributed import (
    check_distributed_sampler,
    check_same_on_all_ranks,
    is_distributed,
    is_main_process,
    sync_buffers,
)
from .masking import attached_masks

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

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


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


@dataclass
class TrainConfig:
    """How the fine-tune runs. Defaults are documented in :meth:`OODUnleash.fit`.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable taking the parameters;
    ``schedule`` is ``"cosine"`` (per step, to zero), ``"constant"`` or a callable
    ``(optimizer, total_steps) -> scheduler`` stepped once per batch.

    ``train_norms``: :func:`train` also trains the scale and shift of ``module``'s
    normalisation layers (:func:`norm_affine_parameters`; parameters with
    ``requires_grad=False`` stay frozen), besides ``params``.

    Speed: ``compile`` runs the forward pass through ``torch.compile`` (``True``, or a dict of
    its keyword arguments such as ``{"mode": "max-autotune"}``; ``{"mode": "reduce-overhead"}``
    adds CUDA graphs on GPUs). A masked model's weights are masked eagerly before each pass and
    enter the compiled graph as inputs, so masks do not split it. ``channels_last`` moves the
    model and the 4-D image batches to that memory format; ``amp`` runs the forward pass in
    float16 on CUDA and bfloat16 on CPU.

    Divergence: the loss is not read on the host after every step (that would be a device
    sync per step); every ``check_every`` steps and at the end of each epoch the losses of
    the steps since the last check are inspected at once. A NaN or infinite loss, or a
    check window in which *every* loss exceeds ``divergence_factor`` x max(first loss,
    ln(classes)) (the loss of a uniform guess), raises :class:`TrainingDivergedError`, at most
    ``check_every`` steps after it began. ``divergence_factor=None`` checks finiteness only.

    Example:
        >>> TrainConfig(epochs=1, outlier_loss="energy").outlier_weight  # Energy-OE default
        0.1
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> history = train(net, list(net.parameters()), data, loss_constraint=0.5,
        ...                 config=TrainConfig(epochs=1), device=torch.device("cpu"),
        ...                 progress=False)
        >>> len(history), history[0]["epoch"]
        (1, 1)
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str | OptimizerFactory = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str | SchedulerFactory = "cosine"
    amp: bool = False
    max_grad_norm: float | None = None
    freeze_norm_stats: bool = False
    train_norms: bool = False
    outlier_loss: Literal["oe", "energy"] | None = None
    outlier_weight: float | None = None
    energy_margins: tuple[float, float] = (-25.0, -7.0)
    compile: bool | dict[str, Any] = False
    channels_last: bool = False
    check_every: int = 20
    divergence_factor: float | None = 1e3

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.outlier_loss not in (None, "oe", "energy"):
            raise ValueError(f"outlier_loss must be 'oe' or 'energy', got {self.outlier_loss!r}.")
        if self.outlier_loss is not None and self.outlier_weight is None:
            # The published defaults: 0.5 for OE, 0.1 for Energy-OE.
            self.outlier_weight = 0.5 if self.outlier_loss == "oe" else 0.1
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(
                f"check_every must be a positive integer (steps between divergence checks), "
                f"got {self.check_every!r}."
            )
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(
                f"divergence_factor must be above 1 (or None), got {self.divergence_factor!r}."
            )
        if not isinstance(self.compile, bool | dict):
            raise TypeError(
                f"compile must be True/False or a dict of torch.compile keyword arguments, "
                f"got {self.compile!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables shown by name)."""
        out = asdict(self)
        for key in ("optimizer", "schedule"):
            if callable(out[key]):
                out[key] = getattr(out[key], "__name__", "custom")
        return out


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

    ``hook`` (see :class:`oodunleash.resume.EpochHook`): ``hook.start(optimizer, scheduler,
    scaler)`` returns the first epoch and the history so far (a resumed fit);
    ``hook.epoch_end(history, optimizer, scheduler, scaler)`` runs after each epoch.
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
